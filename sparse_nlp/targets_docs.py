"""The family support page (``docs/families.md``), rendered from the targets table.

``python -m sparse_nlp.targets_docs docs/families.md`` rewrites the page; a test checks that the committed
page equals `render_families_page()`, so the table can only say what the code does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .targets import FEATURES, TARGETS, ModelTargets

_FEATURE_TITLES = {
    "weights": "Weights (magnitude)",
    "calibration": "One-shot calibration",
    "structured": "Structured removal",
    "attention": "Attention patterns",
    "runtime": "Sparse runtime",
    "activation": "Activation sparsity",
}
COLUMNS = (*FEATURES, "runtime", "activation")
"""The table's feature columns: `FEATURES` (what `sparsify` applies or refuses per family), then the sparse runtime
(`sparse_nlp.runtime.convert`, which packs any pruned Linear layer) and dynamic activation sparsity."""


def activation_cell(entry: ModelTargets) -> str:
    """The activation column of one family: which activation methods `sparsify` accepts (`check_activation` gives
    the same answer; a test checks it on every family with a tiny model) and why the others are refused."""
    if entry.inferred:
        return "no: needs an exact entry (use_targets / --targets-file)"
    accepted, refused = ["teal"], []
    fused_only = bool(entry.experts) and not entry.ffn_out
    if fused_only:
        refused.append(
            "cats and moefication: the FFNs are fused experts (teal thresholds the attention layers)"
        )
    else:
        if entry.gated:
            accepted.append("cats")
        else:
            refused.append("cats: the FFN is not gated")
        accepted.append("moefication")
    note = "; cats and moefication on the shared expert only" if entry.experts and not fused_only else ""
    return f"yes: {', '.join(accepted)}{note}" + (f"; no: {'; '.join(refused)}" if refused else "")


_INFERRED = ModelTargets(
    layers="(inferred)",
    o="",
    ffn_in=(),
    ffn_out=None,
    attention="",
    no_structured="needs an exact entry (use_targets / --targets-file)",
    no_attention="needs an exact entry (use_targets / --targets-file)",
    inferred=True,
)

_INTRO = """# Model families

sparse_nlp finds the layers of a model through a table keyed by `config.model_type`
(`sparse_nlp.targets.TARGETS`). This page is generated from that table by
`python -m sparse_nlp.targets_docs docs/families.md`; a test keeps it equal to the code.

**yes**: the feature applies. **no**: `sparsify` refuses it with the reason given.
Save and load (`sparse_nlp.save_pretrained` / `from_pretrained`, and plain transformers for checkpoints
without sparse attention), `to_dense` and `report` work on every family that `sparsify` accepts.
The sparse runtime column: `sparse_nlp.runtime.convert` packs every pruned `nn.Linear` (and GPT-2 `Conv1D`)
of any model; for each family in the table a test checks that the packed model's logits equal the masked
dense model's. The activation sparsity column names the methods of `ActivationSparsity` (`teal`, `cats`,
`moefication`; see [Activation sparsity](features/activation-sparsity.md)) that `sparsify` accepts for the family;
a test checks each cell against the code on a tiny model of every family.

"""

_OUTRO = """
## Families outside the table

A model whose `model_type` is not in the table gets a layout inferred from its modules, with a one-line
notice: the blocks are the largest `ModuleList` of identical blocks, and inside a block the Linear layers
are sorted by their common names (`q_proj` / `k_proj` / `v_proj` / `o_proj`, `query` / `key` / `value`,
fused `qkv_proj` / `Wqkv` / `c_attn` / `query_key_value`, `gate_proj` / `up_proj` / `down_proj`,
`fc1` / `fc2`, `dense` under an attention or intermediate module). The query projection must hold the
config's `num_attention_heads` x head size, else the inference is refused. An inferred layout serves weight
sparsity with every method and pattern; structured removal and attention patterns need an exact entry.

Give an exact entry for your own model in Python:

```python
from sparse_nlp.targets import ModelTargets

entry = ModelTargets(layers="layers", q="attn.q", k="attn.k", v="attn.v", o="attn.out",
                     ffn_in=("mlp.up",), ffn_out="mlp.down", attention="attn", causal=True)
sparse_nlp.sparsify(model, config, targets=entry)  # or targets="my_targets.json"
```

or as JSON (`ModelTargets.to_dict()`'s form) on the command line:
`sparse-nlp sparsify MODEL --targets-file my_targets.json --out DIR`. Paths are relative to the base
model (`layers`) and to one block (everything else).

## Gemma's embedding scaling and tied head

Gemma 2 and 3 multiply the input embeddings by sqrt(hidden size) and tie the output head to them. Neither is a
target: the groups select Linear layers inside the blocks only, and a `re:` target that reaches a tied
`lm_head` is refused (pruning it would prune the embeddings). Gemma's final logit soft-capping acts on the
head's output and is unchanged by every feature.

## Attention soft-capping (Gemma 2)

Gemma 2 soft-caps its attention logits (`cap * tanh(scores / cap)`, `attn_logit_softcapping`). Under a sparse
attention pattern these layers run the reference kernel with explicit, capped scores (transformers' eager
order: scale, cap, mask, softmax), equal to eager attention under the same mask; the blocked and flex kernels
have no soft-capping, so a request for them runs the reference kernel too (with a one-time warning): exact,
no faster than dense attention. Removing the pattern restores eager attention (Gemma 2 has no SDPA path).

## Mixture of experts

Mixtral, Qwen2-MoE and Qwen3-MoE keep their experts as fused 3-D parameters
(`mlp.experts.gate_up_proj` of shape (experts, 2 x FFN, hidden) and `mlp.experts.down_proj`
(experts, hidden, FFN)). The groups `ffn` and `all-linear` (and `re:` targets naming them) include them:
each expert's (out, in) slice is pruned on its own with the rule's method and pattern (scope `per-layer`
or `per-row`; `global` is refused), its mask is kept through training and saved with the checkpoint like
any other. The router (`mlp.gate`) always stays dense.

Wanda and SparseGPT calibrate each expert on its own routed inputs. During the block-by-block calibration pass
a forward pre-hook on the experts module reads the tokens and the router's top-k choice; for expert `e` it sums,
over the real (non-padding) tokens routed to `e`, the statistics of `gate_up_proj[e]`'s input (the block's
hidden state) and of `down_proj[e]`'s input (`act(gate) * up` of those tokens, from the block before it is
pruned, as for the other layers of a block). Wanda's input norms and
SparseGPT's Hessian of each expert therefore come from its tokens only. An expert that receives no calibration
token is pruned by magnitude instead, with a warning naming it: give more or longer calibration samples to route
tokens to every expert. SparseGPT holds one Hessian per expert (experts x (hidden^2 + FFN^2) floats per block).
Profile `owl` and SparseGPT's `match_dense` option are refused on the experts; exclude them
(`exclude: ["experts"]`) to use those on the other layers.

Gradual magnitude pruning during training (`GradualPruner`, the `SparsityCallback`, recipe stages) prunes the
experts too: at each update of the schedule every expert slice is brought to the scheduled sparsity by
magnitude, and the pruning state saves and resumes their masks. Movement pruning of the experts is refused
(give the experts their own magnitude rule), as is scope `global`. Experts pruned one-shot stay sparse while
training.
"""


def _cell(entry: ModelTargets, feature: str) -> str:
    if feature == "activation":
        return activation_cell(entry)
    if feature == "runtime":
        if entry.experts:
            return (
                "yes: the pruned Linear layers are packed (`runtime.convert`); the fused experts stay dense tensors, "
                "masked"
            )
        return "yes: every pruned Linear layer is packed (`runtime.convert`)"
    reason = entry.refusal(feature)
    if reason:
        return f"no: {reason}"
    if feature == "weights" and entry.inferred:
        return "yes (layout inferred, with a notice)"
    if feature == "weights" and entry.experts:
        return (
            "yes: attention, shared-expert layers and each expert's slice of the fused experts (groups `ffn` "
            "and `all-linear` include them); the router stays dense"
        )
    if feature == "calibration" and entry.experts:
        return (
            "yes: each expert on the calibration tokens its router sends it (an expert that gets none is pruned by "
            "magnitude, with a warning); profile `owl` and SparseGPT's `match_dense` are refused on the experts"
        )
    return "yes"


def support_rows() -> list[tuple[str, str, dict[str, str]]]:
    """(model_type, kind, feature -> cell) for every table entry, then the inferred fallback."""
    rows = []
    for model_type in sorted(TARGETS):
        entry = TARGETS[model_type]
        kind = "decoder" if entry.causal else "encoder"
        if entry.experts:
            kind = "decoder, experts"
        rows.append((model_type, kind, {f: _cell(entry, f) for f in COLUMNS}))
    rows.append(("any other", "inferred", {f: _cell(_INFERRED, f) for f in COLUMNS}))
    return rows


def render_support_table() -> str:
    """The family x feature table as Markdown."""
    header = "| model_type | kind | " + " | ".join(_FEATURE_TITLES[f] for f in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for model_type, kind, cells in support_rows():
        text = " | ".join(cells[f].replace("|", "/") for f in COLUMNS)
        lines.append(f"| `{model_type}` | {kind} | {text} |")
    return "\n".join(lines) + "\n"


def render_families_page() -> str:
    """The whole ``docs/families.md`` page."""
    return _INTRO + render_support_table() + _OUTRO


def main(argv: list[str] | None = None) -> int:
    """Write the page to the path given (default: print it)."""
    parser = argparse.ArgumentParser(
        prog="python -m sparse_nlp.targets_docs",
        description="Render the model-family support page from the targets table.",
    )
    parser.add_argument(
        "out", nargs="?", help="file to write (e.g. docs/families.md); default: print the page"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    page = render_families_page()
    if args.out:
        Path(args.out).write_text(page, encoding="utf-8")
    else:
        print(page, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
