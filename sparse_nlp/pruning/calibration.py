"""The layer-by-layer calibration pass of one-shot pruning (Wanda, SparseGPT, OWL profiles).

How it runs, for encoders and decoders alike:

1. Calibration data (texts, a `datasets` split, a source name, or token ids) becomes a few padded batches.
2. The model runs up to its first block only: a forward pre-hook on block 0 (``with_kwargs=True``) records the
   block's arguments and stops the forward with an exception. The model itself computed the attention mask,
   position ids and rotary embeddings; nothing of the model is re-implemented here.
3. For each block in turn: forward hooks on its target layers gather input statistics over the non-padding
   tokens (per-feature sum of squares; x x^T when a method asks for the Hessian), the layers are pruned, and the
   *pruned* block is run again to turn the stored inputs into the next block's inputs, in place.

So at any time the pass holds one block's activations (one tensor per calibration batch), whatever the depth.
Layers outside the repeated blocks (a regex target on a head) are calibrated at the end with one full forward.
Layers whose method needs no data are pruned first (their choice does not depend on activations), so the
calibrated layers after them see their pruned outputs. Fused mixture-of-experts parameters are calibrated in the
same walk, each expert on the tokens its router sends it (`sparse_nlp.pruning.experts.ExpertStats`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..evaluation.tokens import encode_text
from ..targets import layer_index, linear_weight, model_targets
from .experts import ExpertPlan, ExpertStats, prune_experts
from .methods import LayerStats
from .patterns import NM
from .plan import LayerPlan, attach_oi, prune_without_data
from .profiles import owl_sparsities

logger = logging.getLogger(__name__)

BATCH_SIZE = 32
"""Calibration samples per forward batch (sorted by length first, so batches carry little padding)."""


class _StopForward(Exception):
    """Raised by the block-0 pre-hook once it has recorded the block's inputs."""


@dataclass
class _Batch:
    """One calibration batch as the current block sees it."""

    hidden: torch.Tensor  # (B, T, H) input of the current block
    args: tuple  # the other positional arguments of the block call (hidden removed)
    kwargs: dict[str, Any]
    hidden_in_kwargs: bool
    token_mask: torch.Tensor  # (B, T) bool, True on real tokens
    dense_hidden: torch.Tensor | None = None  # (B, T, H) the same input in the dense model, when tracked


def _track(tensor: torch.Tensor) -> torch.Tensor:
    """Every captured or produced block activation passes through here (tests count live ones)."""
    return tensor


# ---- calibration data -------------------------------------------------------------------------------------

CUTS = ("random", "even", "lines")
"""How a corpus becomes calibration samples: ``random`` windows (seeded), ``even``-ly spaced windows, or its
non-blank ``lines`` (each truncated to the sequence length)."""
WINDOW_SPLITS = {"wikitext2": "valid", "tinyshakespeare": "train"}
"""The corpus split calibration windows are cut from: never WikiText-2's test split, which perplexity scores."""


@dataclass(frozen=True)
class CorpusWindows:
    """Calibration data cut from a corpus the way the Wanda and SparseGPT papers cut it.

    The corpus (``wikitext2``: the *valid* split, ``tinyshakespeare``, or a ``.txt`` path) is joined into one text
    (as `sparse_nlp.evaluation.data.load_text` joins it), tokenized once without special tokens, and
    `num_samples` windows of exactly `seq_len` tokens are taken from it: at seeded random offsets (``cut="random"``)
    or evenly spaced from the start to the end (``cut="even"``). ``cut="lines"`` keeps the older behaviour: the
    corpus's non-blank lines, each truncated to `seq_len`.
    """

    source: str
    cut: str = "random"
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.cut not in CUTS:
            raise ConfigError(f"calibration cut must be one of {', '.join(CUTS)}, got {self.cut!r}.")


def corpus_text(source: str, data_dir: Any = None) -> str:
    """The calibration text of a corpus name (its `WINDOW_SPLITS` split) or a ``.txt`` file."""
    from pathlib import Path

    from ..evaluation.data import DataError, load_text

    if source in WINDOW_SPLITS:
        return load_text(source, WINDOW_SPLITS[source], data_dir)
    path = Path(source).expanduser()
    if path.suffix != ".txt" and not path.is_file():
        raise ConfigError(
            f"calibration windows need a corpus ({', '.join(WINDOW_SPLITS)}) or a .txt file, not {source!r}; "
            "GLUE tasks give sentences (cut 'lines')."
        )
    if not path.is_file():
        raise DataError(f"calibration file {source!r} does not exist.")
    return path.read_text(encoding="utf-8")


def window_starts(num_tokens: int, num_samples: int, seq_len: int, cut: str, seed: int = 0) -> list[int]:
    """Start offsets of `num_samples` windows of `seq_len` tokens in a text of `num_tokens` tokens.

    ``random``: uniform over [0, num_tokens - seq_len] from a `torch.Generator` seeded with `seed` (windows may
    overlap, as in the papers' loaders). ``even``: evenly spaced from 0 to num_tokens - seq_len.

    Raises:
        ConfigError: the text is shorter than one window, or an unknown cut.
    """
    last = num_tokens - seq_len
    if last < 0:
        raise ConfigError(
            f"the calibration text has {num_tokens} tokens, fewer than one window of --seq-len {seq_len}."
        )
    if cut == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, last + 1, (num_samples,), generator=generator).tolist()
    if cut == "even":
        if num_samples == 1:
            return [0]
        return [round(i * last / (num_samples - 1)) for i in range(num_samples)]
    raise ConfigError(f"window cut must be 'random' or 'even', got {cut!r}.")


def calibration_windows(
    data: CorpusWindows | str, tokenizer: Any, *, num_samples: int, seq_len: int
) -> torch.Tensor:
    """(num_samples, seq_len) token ids cut from a corpus (see `CorpusWindows`)."""
    if isinstance(data, str):
        data = CorpusWindows(data)
    if tokenizer is None:
        raise ConfigError("calibration windows are cut from text: pass tokenizer=... to sparsify.")
    text = corpus_text(data.source, data.data_dir)
    ids = encode_text(tokenizer, text)  # (N,)
    starts = window_starts(len(ids), num_samples, seq_len, data.cut, data.seed)
    logger.info(
        "calibration: %d %s windows of %d tokens from %s (%d tokens)",
        num_samples,
        data.cut,
        seq_len,
        data.source,
        len(ids),
    )
    return torch.stack([ids[s : s + seq_len] for s in starts])  # (num_samples, seq_len)


def _is_corpus(data: Any) -> bool:
    if isinstance(data, CorpusWindows):
        return True
    return isinstance(data, str) and (data in WINDOW_SPLITS or data.endswith(".txt"))


def _texts_from(data: Any, num_samples: int) -> list[str] | None:
    """Texts from a source name/path, a list of strings or a `datasets.Dataset`; None for token-id data."""
    if isinstance(data, CorpusWindows):  # cut 'lines' (windows are handled before)
        from ..evaluation.data import calibration_texts

        source = data.source
        return calibration_texts(source, data_dir=data.data_dir, limit=num_samples)
    if isinstance(data, str):
        from ..evaluation.data import calibration_texts

        return calibration_texts(data, limit=num_samples)
    if isinstance(data, Sequence) and data and all(isinstance(x, str) for x in data):
        return list(data)[:num_samples]
    column_names = getattr(data, "column_names", None)
    if column_names is not None and not (isinstance(data, Sequence) and data and isinstance(data[0], dict)):
        for name in ("text", "sentence", "content", "sentence1"):
            if name in column_names:
                return [str(x) for x in data[name][:num_samples]]
        raise ConfigError(
            f"calibration dataset has no text column; looked for text, sentence, content, sentence1 in {column_names}."
        )
    return None


def calibration_batches(
    data: Any,
    tokenizer: Any = None,
    *,
    num_samples: int = 128,
    seq_len: int = 128,
    batch_size: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Padded batches ``{"input_ids", "attention_mask"}`` from calibration data.

    Args:
        data: A list of texts, a `datasets.Dataset` with a text column, a `CorpusWindows`, a corpus name
            (``wikitext2``, ``tinyshakespeare``) or .txt path (random windows of `seq_len` tokens, seed 0, as
            ``CorpusWindows(name)``), a GLUE task name (its sentences), a (N, T) tensor of token ids, or a list of
            dicts with ``input_ids`` (and optionally ``attention_mask``).
        tokenizer: Needed for text data.
        num_samples: Samples used (the first ones).
        seq_len: Texts are truncated to this many tokens.
        batch_size: Samples per batch (default `BATCH_SIZE`; samples are sorted by length to limit padding).

    Raises:
        ConfigError: no data, or texts without a tokenizer.
    """
    if data is None:
        raise ConfigError(
            "calibration needs data: pass data=[texts...] (and tokenizer=...), or --calibration on the command line."
        )
    if _is_corpus(data) and (not isinstance(data, CorpusWindows) or data.cut != "lines"):
        data = calibration_windows(data, tokenizer, num_samples=num_samples, seq_len=seq_len)
    texts = _texts_from(data, num_samples)
    if texts is not None:
        if tokenizer is None:
            raise ConfigError(
                "calibration data are texts but no tokenizer was given; pass tokenizer=... to sparsify."
            )
        encoded = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
        samples = [torch.tensor(ids, dtype=torch.long) for ids in encoded if len(ids) > 0]
        pad_id = getattr(tokenizer, "pad_token_id", None)
    else:
        samples = _id_samples(data, num_samples, seq_len)
        pad_id = None
    if not samples:
        raise ConfigError("calibration data are empty (no sample has any token).")
    pad_id = 0 if pad_id is None else int(pad_id)
    batch_size = batch_size or BATCH_SIZE
    samples.sort(key=len, reverse=True)
    batches = []
    for start in range(0, len(samples), batch_size):
        group = samples[start : start + batch_size]
        length = len(group[0])
        ids = torch.full((len(group), length), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(group), length, dtype=torch.long)  # (B, T)
        for row, sample in enumerate(group):
            ids[row, : len(sample)] = sample
            mask[row, : len(sample)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _id_samples(data: Any, num_samples: int, seq_len: int) -> list[torch.Tensor]:
    """Token-id samples (padding removed) from a tensor, a dict of tensors, or a list of such dicts."""
    if torch.is_tensor(data) or isinstance(data, dict):
        data = [data if isinstance(data, dict) else {"input_ids": data}]
    if not isinstance(data, Sequence) or not all(isinstance(x, dict) and "input_ids" in x for x in data):
        raise ConfigError(
            "calibration data must be texts, a datasets.Dataset with a text column, a source name, a tensor of token "
            f"ids, or dicts with 'input_ids'; got {type(data).__name__}."
        )
    samples = []
    for item in data:
        ids = torch.as_tensor(item["input_ids"])
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids  # (B, T)
        mask = torch.as_tensor(item.get("attention_mask", torch.ones_like(ids))).reshape(ids.shape).bool()
        samples.extend(row[m][:seq_len] for row, m in zip(ids, mask))
    return [s for s in samples[:num_samples] if s.numel() > 0]


# ---- the layer-by-layer pass -----------------------------------------------------------------------------


def _blocks(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    return base.get_submodule(model_targets(model).layers)


def _capture(model: nn.Module, block: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[_Batch]:
    """Inputs of `block` for every batch, stopping the forward at that block."""
    captured: list[_Batch] = []
    current: dict[str, torch.Tensor] = {}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args and torch.is_tensor(args[0]):
            hidden, rest, in_kwargs = args[0], tuple(args[1:]), False
        else:
            hidden, rest, in_kwargs = kwargs.pop("hidden_states"), tuple(args), True
        captured.append(
            _Batch(_track(hidden.detach()), rest, dict(kwargs), in_kwargs, current["mask"].bool())
        )
        raise _StopForward

    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"]
            try:
                model(**{k: v.to(device) for k, v in batch.items()}, **extra)
            except _StopForward:
                pass
            else:
                raise RuntimeError(
                    f"block {type(block).__name__} was never called by {type(model).__name__}.forward"
                )
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, batch: _Batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
    hidden = batch.hidden if hidden is None else hidden
    if batch.hidden_in_kwargs:
        out = block(*batch.args, hidden_states=hidden, **batch.kwargs)
    else:
        out = block(hidden, *batch.args, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


class _StatsHooks:
    """Forward hooks that sum input statistics of some layers over the real tokens of each batch.

    While `recording` is set, the hooks only keep the inputs of the `cross_for` layers (a run of the dense block on
    the dense inputs); the next, normal run adds their cross products with those inputs to ``LayerStats.cross``.
    """

    def __init__(
        self, modules: dict[str, nn.Module], hessian_for: set[str], cross_for: set[str] = frozenset()
    ) -> None:
        self.stats = {name: LayerStats() for name in modules}
        self.token_mask: torch.Tensor | None = None
        self.recording = False
        self._dense: dict[str, list[torch.Tensor]] = {}  # per layer, its dense inputs in call order
        self._handles = [
            module.register_forward_hook(self._hook(name, name in hessian_for, name in cross_for))
            for name, module in modules.items()
        ]

    def _hook(self, name: str, hessian: bool, cross: bool) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach()
            # a second input of another shape (DeBERTa's relative-position embeddings through the shared
            # query / key projections) has no padding: all its rows count
            tokens = self.token_mask is not None and x.dim() == 3 and x.shape[:2] == self.token_mask.shape
            x = x[self.token_mask] if tokens else x.reshape(-1, x.shape[-1])
            x = x.float()  # (n, in)
            if self.recording:
                if cross:
                    self._dense.setdefault(name, []).append(x)
                return
            st = self.stats[name]
            sq = (x * x).sum(0)  # (in,)
            st.sq_norm = sq if st.sq_norm is None else st.sq_norm + sq
            if hessian:
                st.hessian = x.t() @ x if st.hessian is None else st.hessian.addmm_(x.t(), x)  # (in, in)
            if cross:
                xd = self._dense[name].pop(0)  # (n, in) the same call's input in the dense model
                st.cross = xd.t() @ x if st.cross is None else st.cross.addmm_(xd.t(), x)  # (in, in)
            st.count += x.shape[0]

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _layer_types_mixed(model: nn.Module) -> bool:
    types = getattr(model.config, "layer_types", None)
    return bool(types) and len(set(types)) > 1


@torch.no_grad()
def _walk_blocks(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    per_block: Callable[[int, Callable[..., dict[str, LayerStats]]], None],
    *,
    desc: str,
    progress: bool,
    dense: bool = False,
    store: Any = None,
    write: bool = True,
) -> None:
    """Run the calibration batches block by block; `per_block(i, collect)` may gather stats and prune block i.

    ``collect(modules, hessian_for, cross_for=(), experts=None)`` runs block i over the stored inputs with stats
    hooks on `modules` (and the token masks set on an `ExpertStats`, whose hooks the caller owns) and returns their
    stats; after `per_block` returns, block i (as it now is) turns the inputs into
    block i+1's. With `dense`, the dense model's hidden states are carried along too (twice the activations):
    `collect` runs the still-dense block on them first, which gives the `cross_for` layers their dense inputs.
    With a `store` (`sparse_nlp.pruning.onloading.BlockStore`), block i is read from disk before `per_block` and
    written back (unless `write` is False) and freed once it has advanced the inputs.
    """
    blocks = _blocks(model)
    stored = _capture(model, blocks[0], batches)
    if dense:
        for item in stored:
            item.dense_hidden = item.hidden
    types = getattr(model.config, "layer_types", None) if _layer_types_mixed(model) else None
    bar = tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress)
    started = time.perf_counter()
    for i in bar:
        bar.set_postfix_str(f"on block {i + 1}/{len(blocks)}", refresh=True)
        logger.info(
            "%s: block %d/%d (%.0f s so far)", desc, i + 1, len(blocks), time.perf_counter() - started
        )
        block = store.onload(i) if store is not None else blocks[i]
        if types is not None and i > 0 and types[i] != types[i - 1]:
            # blocks of another attention type get another mask: let the model compute that block's arguments
            fresh = _capture(model, block, batches)
            for old, new in zip(stored, fresh):
                old.args, old.kwargs = new.args, new.kwargs
            del fresh
        advanced = [False]

        def collect(
            modules: dict[str, nn.Module],
            hessian_for: set[str],
            cross_for: set[str] = frozenset(),
            experts: ExpertStats | None = None,
            block: nn.Module = block,
            advanced: list = advanced,
        ) -> dict[str, LayerStats]:
            hooks = _StatsHooks(modules, hessian_for, cross_for if dense else frozenset())
            watchers = [hooks] if experts is None else [hooks, experts]
            try:
                for item in stored:
                    for watcher in watchers:
                        watcher.token_mask = item.token_mask
                    if dense and not advanced[0]:
                        for watcher in watchers:
                            watcher.recording = True
                        dense_out = _run_block(block, item, item.dense_hidden)
                        for watcher in watchers:
                            watcher.recording = False
                    _run_block(block, item)
                    if dense and not advanced[0]:
                        item.dense_hidden = _track(dense_out)
            finally:
                hooks.remove()
            advanced[0] = True
            return hooks.stats

        per_block(i, collect)
        for item in stored:  # in place: the inputs of block i become those of block i+1
            if dense and not advanced[0]:
                item.dense_hidden = _track(_run_block(block, item, item.dense_hidden))
            item.hidden = _track(_run_block(block, item))
        if store is not None:
            store.offload(i, write=write)


def _full_forward_stats(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    modules: dict[str, nn.Module],
    hessian_for: set[str],
) -> dict[str, LayerStats]:
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    device = next(model.parameters()).device
    hooks = _StatsHooks(modules, hessian_for)
    try:
        with torch.no_grad():
            for batch in batches:
                hooks.token_mask = batch["attention_mask"].bool()
                model(**{k: v.to(device) for k, v in batch.items()}, **extra)
    finally:
        hooks.remove()
    return hooks.stats


def check_calibration_plans(plans: list) -> None:
    """Reject, before anything changes, what the calibrated pass cannot do (a global budget, OWL with N:M)."""
    for plan in plans:
        calibrated = plan.needs_data
        if calibrated and plan.rule.scope == "global":
            raise ConfigError(
                f"scope 'global' cannot be used with {plan.method.name!r}"
                + (" and profile 'owl'" if plan.rule.profile == "owl" else "")
                + ": the calibrated pass prunes block by block. Use per-layer or per-row (profile 'owl' gives non-uniform "
                "per-layer sparsity at the same total)."
            )
        if plan.rule.profile == "owl" and isinstance(plan.pattern, NM):
            raise ConfigError(
                f"profile 'owl' varies the sparsity per layer, but pattern {plan.pattern} fixes it; use 'unstructured' or "
                "'block:RxC' with profile 'owl', or profile 'uniform' with N:M."
            )


def prune_with_calibration(
    model: nn.Module,
    plans: list[LayerPlan],
    data: Any,
    *,
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 128,
    progress: bool = True,
    store: Any = None,
    experts: Sequence[ExpertPlan] = (),
) -> dict[str, float]:
    """Prune the layers of `plans` one block at a time with statistics of calibration inputs.

    Args:
        model: A transformers model of a supported family (encoder or decoder), in eval mode or not.
        plans: `sparse_nlp.pruning.plan.LayerPlan` items (layer, rule, method, sparsity, pattern).
        data: Calibration data (see `calibration_batches`).
        tokenizer: Tokenizer for text data.
        num_samples: Calibration samples used.
        seq_len: Tokens per sample at most.
        progress: Show a progress bar over blocks.
        store: A `sparse_nlp.pruning.onloading.BlockStore`: blocks are read from disk one at a time and written
            back pruned (sequential onloading); layers that need no data are pruned in the same walk.
        experts: Fused expert parameters pruned with a calibrated method (`sparse_nlp.pruning.experts.ExpertPlan`),
            each expert on the statistics of the calibration tokens routed to it.

    Returns:
        Layer name -> the sparsity it was pruned at (differs from the rule's with profile ``owl``).

    Raises:
        ConfigError: no usable data, or a plan the pass cannot do (see `check_calibration_plans`).
    """
    check_calibration_plans(plans)
    batches = calibration_batches(data, tokenizer, num_samples=num_samples, seq_len=seq_len)
    was_training = model.training
    model.eval()
    try:
        calibrated = [p for p in plans if p.needs_data]
        direct = [p for p in plans if p not in calibrated]
        if direct and store is None:
            prune_without_data(direct, progress)
        direct_by_block: dict[int | None, list] = {}
        for plan in direct if store is not None else []:
            direct_by_block.setdefault(layer_index(model, plan.name), []).append(plan)
        sparsities = {p.name: p.sparsity for p in plans}
        owl = [p for p in calibrated if p.rule.profile == "owl"]
        if owl:
            sparsities.update(
                owl_sparsities(
                    model,
                    owl,
                    lambda fn, desc: _walk_blocks(
                        model, batches, fn, desc=desc, progress=progress, store=store, write=False
                    ),
                )
            )

        by_block: dict[int | None, list] = {}
        for plan in calibrated:
            by_block.setdefault(layer_index(model, plan.name), []).append(plan)

        def prune(group: list, stats: dict[str, LayerStats]) -> None:
            for p in group:
                mask, new_weight = p.method.prune_layer(
                    linear_weight(p.module), sparsities[p.name], p.pattern, p.rule.scope, stats.get(p.name)
                )
                attach_oi(p.module, mask, new_weight)

        dense = any(p.method.needs_dense_inputs for p in calibrated)
        experts_by_block: dict[int | None, list[ExpertPlan]] = {}
        for plan in experts:
            experts_by_block.setdefault(layer_index(model, plan.name), []).append(plan)

        def per_block(i: int, collect: Callable) -> None:
            if direct_by_block.get(i):  # as in the in-memory pass: before this block's statistics
                prune_without_data(direct_by_block[i], False)
            group = by_block.get(i, [])
            need = [p for p in group if p.method.needs_calibration]
            block_experts = experts_by_block.get(i, [])
            if not need and not block_experts and not (dense and group):
                prune(group, {})
                return
            watch = ExpertStats(block_experts) if block_experts else None
            try:
                stats = collect(
                    {p.name: p.module for p in need},
                    {p.name for p in need if p.method.needs_hessian},
                    {p.name for p in need if p.method.needs_dense_inputs},
                    watch,
                )
            finally:
                if watch is not None:
                    watch.remove()
            prune(group, stats)
            if watch is not None:
                prune_experts(block_experts, stats=watch.stats)

        if any(i is not None for i in by_block) or direct_by_block or experts_by_block:
            _walk_blocks(
                model,
                batches,
                per_block,
                desc="one-shot pruning",
                progress=progress,
                dense=dense,
                store=store,
            )
        outside = by_block.get(None, [])
        if (
            outside
        ):  # layers outside the blocks (heads): one full forward of the pruned model gives their inputs
            need = [p for p in outside if p.method.needs_calibration]
            stats = _full_forward_stats(
                model,
                batches,
                {p.name: p.module for p in need},
                {p.name for p in need if p.method.needs_hessian},
            )
            prune(outside, stats)
    finally:
        model.train(was_training)
    logger.info("one-shot pruned %d layers with %d calibration batches", len(plans), len(batches))
    return sparsities
