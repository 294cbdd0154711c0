"""Conformance grid for the varlen_diffusion plugin: sglang's diffusion varlen test grids, run on our ops.

Upstream (sgl-project/sglang, seed PR #26318; the files moved from
``python/sglang/jit_kernel/tests/diffusion/`` to ``test/registered/kernels/ops/diffusion/`` with the same
grids). What was taken from each, as facts (the code here is our own):

- ``test_varlen_pack_pad.py`` (fused pack/scatter kernels, bit-exact against torch ``index_select`` and
  ``zeros + index_copy_``): its full (nightly) shape list, :data:`PACK_PAD_SHAPES`: seven
  ``(name, batch, s_txt, s_img, heads, head_dim, valid_txt_lens)`` tuples over text-then-image joint
  masks (``mask[b, :valid_txt] = mask[b, s_txt:] = True``: right-padded text, then image tokens, so a gap
  in the middle of the row), including all-valid rows (b1, b4), zero valid text tokens in one row or the
  only row, and the production-size ``c8_prod`` (8 x 4352 tokens, 24 heads, head dim 128); dtypes bf16
  and fp16; the checks (pack == gather, scatter == index_copy into zeros, padded rows exactly zero);
  ``test_pack_handles_non_contiguous_input`` (Q/K/V as ``[B, H, S, D]`` permuted to ``[B, S, H, D]``,
  small_c2 shape, bf16): :data:`NON_CONTIGUOUS_PACK`; ``test_build_inv_indices_matches_manual`` (a
  Bernoulli(0.6) mask, batch 2, S 32, seed 3; the inverse map is ``-1`` where masked): the
  ``bernoulli_b2_s32`` case, checked through our metadata (``build_mask_meta``'s ``indices``/``inverse``);
  ``test_empty_valid_set_handled`` (all-False mask, batch 2, S 16, 4 heads, head dim 64: pack gives empty
  tensors, scatter all zeros): the ``empty_b2_s16`` case.
- ``test_varlen_uspattn_equivalence.py`` (build meta + pack + varlen FA + scatter against SDPA with a
  broadcast key mask): its full shape list, :data:`USPATTN_SHAPES` (small_c2, prod_c2, all_valid_b1,
  zero_txt_one_batch: a subset of the pack/pad list), dtypes bf16 and fp16, the softmax scale
  ``head_dim ** -0.5``, the tolerances (:data:`TOLERANCE`: bf16 rtol 1e-2 / atol 5e-2, fp16 5e-3 / 1e-2),
  and the contract that valid query rows match the reference while masked query rows are exactly zero
  (sglang's contract, ours under the ``qkv_pack`` strategy; see below).

Our own additions (``source="ours"``), for what the upstream grids leave out but our contract covers:
right (prefix) and left (suffix) padding, padding on both sides, a single valid token per row, a row
with no valid key next to valid rows, a batch with no valid key at all, Bernoulli-ragged rows, GQA, head
dims 96 and 256, strided inputs (slices of one fused QKV projection, ``[B, H, S, D]`` views), a custom
softmax scale, and cross-attention (``S_q != S_k``) built from the upstream shapes: image queries over
the padded text keys (a row with zero valid text tokens then has no visible key) and over the joint
text+image keys. The pack/pad shapes outside the equivalence list (all_valid_b4, c8_prod, bs1_zero_txt)
also run through ``masked_attention`` (it runs the pack kernels too).

The contract (``attn_dispatch_varlen_diffusion.attention``), which :func:`reference_attention` follows:
a query row attends to its batch element's valid keys (softmax over the visible keys only); under the
default ``kv_pack`` strategy that holds for masked query rows too (SDPA masks keys only), under
``qkv_pack`` masked query rows of self-attention are exactly zero; every query row of a batch element with
no valid key is exactly zero in every strategy (where SDPA's answer depends on backend: NaN or zeros).
Cross-attention has no masked query rows.

Variants (:data:`VARIANTS`): the plugin's ``strategy`` setting, ``kv_pack`` and ``qkv_pack``, as
``attn_dispatch.load`` builds it (prefix/window masks then run zero-copy, and ``qkv_pack`` packs Q only
where its cost model says so), plus the forced routes that load never picks for these shapes: K/V packing
of prefix/window masks, and ``qkv_pack`` with Q packed or Q in place for every mask (``build_ops``'s
``zero_copy``/``pack_queries``, as ``test_cuda.py`` builds them). :func:`route` names the path each
(mask, variant) takes; ``test_conformance.py`` checks the grid reaches every one.

Not covered, and why: sglang's gating in ``USPAttention.forward`` (which inputs take the varlen path) and
its SDPA fallback: our gating is the plugin's ``_flash_can_run``/fallback, tested in
``test_masked_attention.py``; ``build_inv_indices`` as a separate function: we have no such op, the map
is built inside ``build_mask_meta`` and checked there; the CI-reduced sglang subsets
(``get_ci_test_range``'s second list): the full lists are used, as sglang's nightly run does; sglang's
``fa_ver`` switch: which FlashAttention runs is the plugin's provider probe (FA3 on sm90, FA4 on sm100);
float (additive) masks: they run the original SDPA path unchanged (``test_masked_attention.py``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

UPSTREAM_PACK_PAD = "sglang test_varlen_pack_pad.py"
UPSTREAM_USPATTN = "sglang test_varlen_uspattn_equivalence.py"
OURS = "ours"

DTYPES = (torch.bfloat16, torch.float16)
# (rtol, atol) of test_varlen_uspattn_equivalence.py: FlashAttention against SDPA.
TOLERANCE = {torch.bfloat16: (1e-2, 5e-2), torch.float16: (5e-3, 1e-2)}
# Cases of at most this many elements per Q/K/V tensor also run on CPU (the Triton interpreter).
CPU_MAX_ELEMENTS = 2**18

Runs = tuple[tuple[int, int], ...]  # one mask row: its valid runs [start, stop), in order


@dataclass(frozen=True)
class Shape:
    """One upstream shape tuple: joint text+image tokens, text right-padded to ``s_txt``."""

    name: str
    batch: int
    s_txt: int
    s_img: int
    heads: int
    head_dim: int
    valid_txt: tuple[int, ...]


# test_varlen_pack_pad.py, full list (nightly), in its order.
PACK_PAD_SHAPES = (
    Shape("small_c2", 2, 64, 128, 4, 64, (32, 48)),
    Shape("prod_c2", 2, 256, 1024, 24, 128, (128, 200)),
    Shape("all_valid_b1", 1, 64, 128, 4, 64, (64,)),
    Shape("all_valid_b4", 4, 64, 128, 4, 64, (64, 64, 64, 64)),
    Shape("c8_prod", 8, 256, 4096, 24, 128, (128, 200, 256, 100, 50, 256, 256, 50)),
    Shape("zero_txt_one_batch", 2, 64, 128, 4, 64, (0, 32)),
    Shape("bs1_zero_txt", 1, 64, 128, 4, 64, (0,)),
)
# test_varlen_uspattn_equivalence.py, full list (nightly): the same tuples as the pack/pad ones of these names.
USPATTN_SHAPES = tuple(
    s for s in PACK_PAD_SHAPES if s.name in ("small_c2", "prod_c2", "all_valid_b1", "zero_txt_one_batch")
)


@dataclass(frozen=True)
class Case:
    """One configuration: a key mask given as valid runs per row, the tensor sizes and memory layout.

    Self-attention when ``seqlen_q`` is None (queries are the masked tokens); cross-attention otherwise
    (``seqlen_q`` query rows, all valid, over the ``seqlen`` masked keys). ``layout``: ``contiguous``,
    ``heads_first`` (``[B, H, S, D]`` tensors viewed as ``[B, S, H, D]``) or ``qkv_slices`` (Q, K, V
    as slices of one ``[B, S, 3, H, D]`` projection; self-attention without GQA only).
    """

    name: str
    source: str
    rows: tuple[Runs, ...]
    seqlen: int
    heads: int
    head_dim: int
    kv_heads: int | None = None
    seqlen_q: int | None = None
    layout: str = "contiguous"
    softmax_scale: float | None = None

    def __post_init__(self) -> None:
        for runs in self.rows:  # sorted, disjoint, non-adjacent runs inside the row
            ends = [x for run in runs for x in run]
            assert all(len(run) == 2 and run[0] < run[1] for run in runs), f"{self.name}: bad runs {runs}"
            assert ends == sorted(ends) and len(set(ends)) == len(ends), f"{self.name}: runs overlap or touch {runs}"
            assert not ends or (ends[0] >= 0 and ends[-1] <= self.seqlen), f"{self.name}: runs outside 0..{self.seqlen}"
        assert self.heads % self.h_kv == 0, f"{self.name}: kv_heads must divide heads"

    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def cross(self) -> bool:
        return self.seqlen_q is not None

    @property
    def q_len(self) -> int:
        return self.seqlen if self.seqlen_q is None else self.seqlen_q

    @property
    def h_kv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def elements(self) -> int:
        return self.batch * max(self.seqlen, self.q_len) * self.heads * self.head_dim

    @property
    def on_cpu(self) -> bool:
        """Small enough for the CPU subset (Triton interpreter, torch stand-in provider)."""
        return self.elements <= CPU_MAX_ELEMENTS

    def mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        mask = torch.zeros(self.batch, self.seqlen, dtype=torch.bool)
        for b, runs in enumerate(self.rows):
            for start, stop in runs:
                mask[b, start:stop] = True
        return mask.to(device)

    def describe(self) -> str:
        kind = f"cross S_q={self.seqlen_q}" if self.cross else "self"
        gqa = f" H_kv={self.kv_heads}" if self.kv_heads is not None else ""
        extra = "" if self.layout == "contiguous" else f" {self.layout}"
        extra += "" if self.softmax_scale is None else f" scale={self.softmax_scale}"
        return f"{self.name} [{self.source}] B={self.batch} S={self.seqlen} H={self.heads}{gqa} D={self.head_dim} {kind}{extra}"


def text_image_rows(shape: Shape) -> tuple[Runs, ...]:
    """Upstream's ``_build_mask`` as runs: valid text ``0..n``, then every image token."""
    total = shape.s_txt + shape.s_img
    return tuple(
        ((0, total),) if n == shape.s_txt else (((0, n),) if n else ()) + ((shape.s_txt, total),)
        for n in shape.valid_txt
    )


def rows_of(mask: torch.Tensor) -> tuple[Runs, ...]:
    """The valid runs of each row of a bool ``[B, S]`` mask."""
    rows = []
    for line in mask.tolist():
        runs, start = [], None
        for s, bit in enumerate([*line, False]):
            if bit and start is None:
                start = s
            elif not bit and start is not None:
                runs.append((start, s))
                start = None
        rows.append(tuple(runs))
    return tuple(rows)


def _from_shape(shape: Shape, source: str, **kw) -> Case:
    return Case(
        shape.name, source, text_image_rows(shape), shape.s_txt + shape.s_img, shape.heads, shape.head_dim, **kw
    )


def _bernoulli_rows(batch: int, seqlen: int, p: float, seed: int) -> tuple[Runs, ...]:
    gen = torch.Generator().manual_seed(seed)
    return rows_of(torch.rand(batch, seqlen, generator=gen) < p)


S = 192  # the upstream small shapes' joint length (64 text + 128 image tokens)
EMPTY_B2_S16 = Case("empty_b2_s16", UPSTREAM_PACK_PAD, ((), ()), 16, 4, 64)  # test_empty_valid_set_handled
BERNOULLI_B2_S32 = Case("bernoulli_b2_s32", UPSTREAM_PACK_PAD, _bernoulli_rows(2, 32, 0.6, 3), 32, 4, 64)
NON_CONTIGUOUS_PACK = Case(  # test_pack_handles_non_contiguous_input: small_c2, [B, H, S, D] permuted
    "small_c2_non_contiguous", UPSTREAM_PACK_PAD, text_image_rows(PACK_PAD_SHAPES[0]), S, 4, 64, layout="heads_first"
)

SELF_EXTRA = (
    Case("right_padding", OURS, (((0, S),), ((0, 100),), ((0, 1),)), S, 4, 64),  # prefix layout: zero-copy
    Case("left_padding", OURS, (((0, S),), ((50, S),), ((S - 1, S),)), S, 4, 64),  # window layout
    Case("both_sides", OURS, (((30, 130),), ((1, 2),), ((64, S - 20),)), S, 4, 64),
    Case("single_token", OURS, (((0, 1),), ((95, 96),), ((S - 1, S),)), S, 4, 64),
    Case("single_token_gap", OURS, (((3, 4), (150, 151)), ((0, 1),), ((S - 1, S),)), S, 4, 64),
    Case("masked_row_mid_batch", OURS, (((0, 20), (64, S)), (), ((0, S),)), S, 4, 64),
    Case("masked_row_prefix", OURS, ((), ((0, 77),)), S, 4, 64),
    Case("masked_batch", OURS, ((), ()), S, 4, 64),
    Case("bernoulli_b3", OURS, _bernoulli_rows(3, 96, 0.5, 7), 96, 4, 64),
    Case("gqa_h8_kv2", OURS, text_image_rows(PACK_PAD_SHAPES[0]), S, 8, 128, kv_heads=2),
    Case("gqa_h24_kv1", OURS, text_image_rows(PACK_PAD_SHAPES[5]), S, 24, 64, kv_heads=1),
    Case("head_dim_96", OURS, text_image_rows(PACK_PAD_SHAPES[0]), S, 4, 96),
    Case("head_dim_256", OURS, text_image_rows(PACK_PAD_SHAPES[5]), S, 2, 256),
    Case("qkv_slices", OURS, text_image_rows(PACK_PAD_SHAPES[0]), S, 4, 64, layout="qkv_slices"),
    Case("heads_first", OURS, text_image_rows(PACK_PAD_SHAPES[5]), S, 4, 64, layout="heads_first"),
    Case("heads_first_prod", OURS, text_image_rows(PACK_PAD_SHAPES[1]), 1280, 24, 128, layout="heads_first"),
    Case("softmax_scale", OURS, text_image_rows(PACK_PAD_SHAPES[0]), S, 4, 64, softmax_scale=0.3),
)


def self_attention_cases() -> list[Case]:
    """The equivalence test's shapes, the other pack/pad shapes, then ours."""
    upstream = [_from_shape(s, UPSTREAM_USPATTN) for s in USPATTN_SHAPES]
    upstream += [_from_shape(s, UPSTREAM_PACK_PAD) for s in PACK_PAD_SHAPES if s not in USPATTN_SHAPES]
    return upstream + list(SELF_EXTRA)


def cross_attention_cases() -> list[Case]:
    """Image queries over the upstream shapes' padded text keys and over their joint keys; then GQA."""
    cases = []
    for s in USPATTN_SHAPES:
        text = tuple(((0, n),) if n else () for n in s.valid_txt)
        cases.append(Case(f"{s.name}_img_over_txt", OURS, text, s.s_txt, s.heads, s.head_dim, seqlen_q=s.s_img))
        cases.append(
            Case(
                f"{s.name}_img_over_joint",
                OURS,
                text_image_rows(s),
                s.s_txt + s.s_img,
                s.heads,
                s.head_dim,
                seqlen_q=s.s_img,
            )
        )
    small, zero_txt = PACK_PAD_SHAPES[0], PACK_PAD_SHAPES[5]
    cases += [
        Case("gqa_img_over_txt", OURS, (((0, 32),), ()), 64, 8, 128, kv_heads=2, seqlen_q=small.s_img),
        Case("gqa_mqa_over_joint", OURS, text_image_rows(zero_txt), S, 4, 64, kv_heads=1, seqlen_q=100),
        Case("left_padded_txt", OURS, (((10, 64),), ((63, 64),)), 64, 4, 64, seqlen_q=128, layout="heads_first"),
        Case("txt_over_img_scale", OURS, (((0, 128),), ((0, 5),)), 128, 4, 64, seqlen_q=64, softmax_scale=0.3),
    ]
    return cases


def pack_cases() -> list[Case]:
    """The pack/pad test's shapes and its three single cases (non-contiguous, Bernoulli, empty), then ours."""
    cases = [_from_shape(s, UPSTREAM_PACK_PAD) for s in PACK_PAD_SHAPES]
    cases += [NON_CONTIGUOUS_PACK, BERNOULLI_B2_S32, EMPTY_B2_S16]
    ours = ("right_padding", "left_padding", "single_token", "masked_row_mid_batch", "head_dim_96", "qkv_slices")
    cases += [c for c in SELF_EXTRA if c.name in ours]
    return cases


@dataclass(frozen=True)
class Variant:
    """One way to run the op group: the ``strategy`` setting, and the forced ``build_ops`` arguments."""

    name: str
    strategy: str
    zero_copy: bool = True
    pack_queries: bool | None = None
    loaded: bool = False  # what attn_dispatch.load builds for this setting (no forced arguments)

    @property
    def zeroes_masked_queries(self) -> bool:
        return self.strategy == "qkv_pack"


VARIANTS = (
    Variant("kv_pack", "kv_pack", loaded=True),
    Variant("qkv_pack", "qkv_pack", loaded=True),
    Variant("kv_pack_forced", "kv_pack", zero_copy=False),
    Variant("qkv_pack_q_packed", "qkv_pack", zero_copy=False, pack_queries=True),
    Variant("qkv_pack_q_in_place", "qkv_pack", zero_copy=False, pack_queries=False),
)


def route(meta, cross: bool) -> str:
    """The path ``binding.bind_call`` lays out for this metadata (self- or cross-attention)."""
    from attn_dispatch_varlen_diffusion.meta import Strategy

    kind = "cross" if cross else "self"
    if meta.total == 0:
        return "no valid key: zeros"
    if not cross and meta.pack_queries:
        return "self: pack Q/K/V, scatter"
    if meta.strategy is not Strategy.ZERO_COPY:
        zeroing = not cross and meta.masked is not None and meta.batch * meta.seqlen > meta.total
        return f"{kind}: pack K/V" + (", zero masked rows" if zeroing else "")
    if not cross and meta.zero_masked_queries:
        return "self: zero-copy, seqused_q"
    return f"{kind}: zero-copy"


# Inputs and the reference.
def _seed(case: Case, dtype: torch.dtype, salt: str) -> int:
    return zlib.crc32(f"{case.name}/{case.source}/{dtype}/{salt}".encode())


def make_qkv(case: Case, dtype: torch.dtype, device: torch.device | str, salt: str = "qkv") -> tuple[torch.Tensor, ...]:
    """Q ``[B, S_q, H, D]``, K/V ``[B, S, H_kv, D]``, laid out as ``case.layout`` says (seeded per case)."""
    gen = torch.Generator(device=device).manual_seed(_seed(case, dtype, salt))
    b, h, h_kv, d = case.batch, case.heads, case.h_kv, case.head_dim

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=dtype, device=device)

    if case.layout == "qkv_slices":
        assert not case.cross and h_kv == h, "qkv_slices: self-attention without GQA"
        return randn(b, case.seqlen, 3, h, d).unbind(2)
    if case.layout == "heads_first":
        return randn(b, h, case.q_len, d).transpose(1, 2), *(
            randn(b, h_kv, case.seqlen, d).transpose(1, 2) for _ in range(2)
        )
    assert case.layout == "contiguous", case.layout
    return randn(b, case.q_len, h, d), *(randn(b, case.seqlen, h_kv, d) for _ in range(2))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    zero_masked_queries: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain float32 attention by the contract (no SDPA): ``(out [B, S_q, H, D], zero_rows [B, S_q])``.

    Each query row takes the softmax over its batch element's visible keys only (GQA: K/V head ``j``
    serves query heads ``j * H / H_kv ...``). ``zero_rows``: rows the contract sets to exactly zero, a
    batch element with no visible key, and under ``zero_masked_queries`` the masked query rows of
    self-attention; ``out`` holds zeros there.
    """
    batch, seqlen_q, heads, head_dim = q.shape
    group = heads // k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    has_keys = key_mask.any(dim=1)
    zero_rows = (~has_keys)[:, None].expand(batch, seqlen_q).clone()
    if zero_masked_queries and seqlen_q == key_mask.shape[1]:
        zero_rows |= ~key_mask
    out = torch.zeros(batch, seqlen_q, heads, v.shape[3], dtype=torch.float32, device=q.device)
    for b in range(batch):
        visible = key_mask[b]
        if not bool(has_keys[b]):
            continue
        keys = k[b, visible].float().repeat_interleave(group, dim=1)  # [n, H, D]
        values = v[b, visible].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[b].float(), keys) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hqk,khd->qhd", probs, values)
    out[zero_rows] = 0.0
    return out, zero_rows


def attention_problems(out: torch.Tensor, ref: torch.Tensor, zero_rows: torch.Tensor, dtype: torch.dtype) -> list[str]:
    """What is wrong with ``out`` against the reference: shape/dtype/layout, rows the contract sets to zero
    that are not exactly zero, and computed rows off the tolerance (with the error measured)."""
    if out.shape != ref.shape or out.dtype != dtype:
        return [f"returned {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {dtype}"]
    problems = [] if out.is_contiguous() else ["output is not contiguous"]
    got = out.float()
    if zero_rows.any():
        rows = got[zero_rows]
        if not torch.equal(rows, torch.zeros_like(rows)):
            bad = (rows != 0).flatten(1).any(dim=1).sum().item()
            problems.append(
                f"{bad} of {rows.shape[0]} rows that must be exactly zero are not (NaN: {rows.isnan().any().item()})"
            )
    live = ~zero_rows
    if live.any():
        rtol, atol = TOLERANCE[dtype]
        a, e = got[live], ref[live]
        err = (a - e).abs()
        off = ~(err <= atol + rtol * e.abs())
        if off.any() or a.isnan().any():
            problems.append(
                f"{off.sum().item()} of {a.numel()} computed elements off rtol={rtol} atol={atol}: "
                f"max abs err {err.nan_to_num(float('inf')).max().item():.3g}, mean {err.nan_to_num(0).mean().item():.3g}"
            )
    return problems


# Pack / scatter: the torch side.
def flat_indices(mask: torch.Tensor) -> torch.Tensor:
    """int32 ``b * S + s`` of every valid token, in order (upstream: ``mask.reshape(-1).nonzero()``)."""
    return mask.reshape(-1).nonzero().flatten().to(torch.int32)


def inverse_of(indices: torch.Tensor, rows: int) -> torch.Tensor:
    """Each padded row's packed position, -1 where masked (upstream's manual ``build_inv_indices``)."""
    inverse = torch.full((rows,), -1, dtype=torch.int32, device=indices.device)
    inverse[indices.long()] = torch.arange(indices.numel(), dtype=torch.int32, device=indices.device)
    return inverse


def torch_gather(sources: Sequence[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """``[len(sources), n, H, D]``: ``index_select`` on each source's flat rows."""
    return torch.stack([x.reshape(-1, *x.shape[2:]).index_select(0, indices.long()) for x in sources])


def torch_scatter(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """``zeros(batch * seqlen) .index_copy_(indices, packed)`` viewed ``[batch, seqlen, H, D]``."""
    out = torch.zeros(batch * seqlen, *packed.shape[1:], dtype=packed.dtype, device=packed.device)
    return out.index_copy_(0, indices.long(), packed).view(batch, seqlen, *packed.shape[1:])


def bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns, so ``torch.equal`` also tells -0.0 from 0.0 and NaN payloads apart."""
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.element_size()])


def meta_problems(meta, mask: torch.Tensor) -> list[str]:
    """``build_mask_meta``'s varlen tensors against the torch ones for ``mask``."""
    problems = []
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    if meta.total != int(seqlens.sum()) or not torch.equal(meta.seqlens, seqlens):
        problems.append(f"seqlens {meta.seqlens.tolist()} total {meta.total}, expected {seqlens.tolist()}")
    indices = flat_indices(mask)
    if meta.indices is not None:
        if not torch.equal(meta.indices[: indices.numel()], indices):
            problems.append("indices differ from mask.reshape(-1).nonzero()")
        if meta.strategy.value == "kv_pack" and not torch.equal(meta.indices[indices.numel() :], flat_indices(~mask)):
            problems.append("kv_pack's indices do not go on with the masked tokens, in order")
        cu = torch.cat([seqlens.new_zeros(1), seqlens.cumsum(0, dtype=torch.int32)])
        if not torch.equal(meta.cu_seqlens_k, cu):
            problems.append(f"cu_seqlens_k {meta.cu_seqlens_k.tolist()}, expected {cu.tolist()}")
    if meta.inverse is not None and not torch.equal(meta.inverse, inverse_of(indices, mask.numel())):
        problems.append("inverse differs from the manual map (-1 where masked)")
    if meta.masked is not None and not torch.equal(meta.masked, (~mask).reshape(-1).nonzero().flatten()):
        problems.append("masked positions differ from (~mask).nonzero()")
    return problems
