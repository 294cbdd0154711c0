"""Key masks for the tests: named layouts and a Hypothesis strategy over rows of every kind."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

ROW_KINDS = ("full", "prefix", "suffix", "window", "gaps", "none")


def row(kind: str, seqlen: int, a: int = 0, b: int = 0, bits: int = 0) -> list[bool]:
    """One mask row of ``kind``: ``prefix`` keeps ``a`` keys, ``suffix`` starts at ``a``, ``window`` spans
    ``a..b`` (either order), ``gaps`` keeps the set bits of ``bits``. Positions wrap modulo ``seqlen + 1``."""
    a, b = a % (seqlen + 1), b % (seqlen + 1)
    lo, hi = sorted((a, b))
    if kind == "full":
        return [True] * seqlen
    if kind == "none":
        return [False] * seqlen
    if kind == "prefix":  # right padding
        return [s < a for s in range(seqlen)]
    if kind == "suffix":  # left padding
        return [s >= a for s in range(seqlen)]
    if kind == "window":
        return [lo <= s < hi for s in range(seqlen)]
    return [bool((bits >> s) & 1) for s in range(seqlen)]  # gaps: any pattern


@st.composite
def key_masks(draw, max_batch: int = 3, max_seqlen: int = 12) -> torch.Tensor:
    batch = draw(st.integers(1, max_batch))
    seqlen = draw(st.integers(1, max_seqlen))
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(ROW_KINDS))
        rows.append(row(kind, seqlen, draw(st.integers(0, 64)), draw(st.integers(0, 64)), draw(st.integers(0, 2**seqlen - 1))))
    return torch.tensor(rows, dtype=torch.bool)


def text_image_mask(valid_text: list[int], text: int, image: int, *, text_first: bool) -> torch.Tensor:
    """Joint attention over ``text`` (padded) and ``image`` tokens. Text first leaves a gap (general);
    image first makes the valid keys a prefix."""
    rows = []
    for n in valid_text:
        text_row = [True] * n + [False] * (text - n)
        rows.append(text_row + [True] * image if text_first else [True] * image + text_row)
    return torch.tensor(rows, dtype=torch.bool)
