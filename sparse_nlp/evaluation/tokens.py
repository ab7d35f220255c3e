"""Token ids of a long text, computed a piece at a time with the same result as one tokenizer call.

A fast tokenizer holds several hundred bytes per character while it encodes one string (offsets, alignments,
pre-token strings): about 130 MiB for the 1.1 MB of WikiText-2's valid split. Perplexity and calibration
windows tokenize a whole corpus at once, so that transient memory can exceed a small model's own size.
`encode_text` cuts the text at newlines where the tokenizer's own pre-tokenizer gives the same pre-tokens
for the text around the cut whole as for its two pieces (checked at every cut), and encodes the pieces one
after another. BPE merges never cross a pre-token, so the ids are those of
``tokenizer(text, add_special_tokens=False)``; where no cut passes the check (a normalizer, no pre-tokenizer,
a prefix added to every piece, added tokens near every newline) the text is encoded in one call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

CHUNK_CHARS = 1 << 15
"""Characters per piece (about 16 MiB of transient tokenizer memory)."""
CHECK_CHARS = 256
"""Characters each side of a cut that the pre-tokenizer sees to confirm the cut is a pre-token boundary."""


def _ids(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # (n,)


def _cuttable(tokenizer: Any) -> Any:
    """The backend pre-tokenizer when pieces can be checked against it, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or backend.pre_tokenizer is None:
        return None
    return backend


def _splits_alike(backend: Any, text: str, cut: int) -> bool:
    """Whether the pre-tokens around `cut` are the same for the text whole and for its two pieces."""
    lo, hi = max(0, cut - CHECK_CHARS), min(len(text), cut + CHECK_CHARS)
    pre = backend.pre_tokenizer.pre_tokenize_str
    whole = pre(text[lo:hi])
    left = pre(text[lo:cut])
    right = [(s, (a + cut - lo, b + cut - lo)) for s, (a, b) in pre(text[cut:hi])]
    return whole == left + right


def _cuts(backend: Any, text: str, chunk_chars: int) -> Iterator[int]:
    """Offsets, about `chunk_chars` apart, at a newline, where the pre-tokens of the text whole and of its two
    pieces agree, and with no added token (special tokens, split off before pre-tokenization) near."""
    added = [t.content for t in backend.get_added_tokens_decoder().values() if t.content]
    target = chunk_chars
    while target < len(text) - chunk_chars:
        newline = text.find("\n", target)
        if newline < 0 or newline + 1 >= len(text) - CHECK_CHARS:
            return
        for cut in (newline, newline + 1):
            window = text[max(0, cut - CHECK_CHARS) : cut + CHECK_CHARS]
            if not any(a in window for a in added) and _splits_alike(backend, text, cut):
                yield cut
                target = cut + chunk_chars
                break
        else:
            target = newline + 1  # try the next newline


def encode_text(tokenizer: Any, text: str, chunk_chars: int = CHUNK_CHARS) -> torch.Tensor:
    """(N,) int64 ids of ``tokenizer(text, add_special_tokens=False)``, encoded a piece at a time when long.

    The first cut is also checked end to end (the text up to a little past it encoded whole against its two
    pieces); when that differs, or the tokenizer cannot be checked, the text is encoded in one call.
    """
    backend = _cuttable(tokenizer) if len(text) > 2 * chunk_chars else None
    if backend is None:
        return _ids(tokenizer, text)
    pieces: list[torch.Tensor] = []
    start = 0
    for cut in _cuts(backend, text, chunk_chars):
        if not pieces:
            head, tail = _ids(tokenizer, text[:cut]), _ids(tokenizer, text[cut : cut + 4 * CHECK_CHARS])
            if not torch.equal(torch.cat([head, tail]), _ids(tokenizer, text[: cut + 4 * CHECK_CHARS])):
                return _ids(tokenizer, text)  # pieces are not encoded like the whole (e.g. a prefix space)
            pieces.append(head)
        else:
            pieces.append(_ids(tokenizer, text[start:cut]))
        start = cut
    pieces.append(_ids(tokenizer, text[start:]))
    return torch.cat(pieces)
