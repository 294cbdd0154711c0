"""Conformance: sglang's diffusion varlen test grids run on our ``masked_attention`` op group and our Triton
pack/scatter kernels, against plain torch (the grid, its sources and what it leaves out:
``conformance_cases``).

GPU (marked ``cuda`` and ``conformance``; skipped without a GPU): the ops ``attn_dispatch.load("cuda")``
builds for each ``strategy`` setting, and the routes ``build_ops`` can force on the provider that load
chose, against the float32 reference with the upstream FlashAttention tolerances; the pack/scatter
kernels (plain and bound launches) bit-exact against torch gather/scatter; ``build_mask_meta``'s varlen
tensors exact. Run on its own: ``python3 -m pytest -m conformance plugins/varlen_diffusion/tests``.

CPU (unmarked, so CI runs it): the small pack/scatter cases through the Triton interpreter, a few
masked_attention cases through the torch stand-in provider (``varlen_torch_provider``), and checks of the
grid itself (the reference against ``attn_dispatch.reference``, every route reached).
"""

from __future__ import annotations

import pytest
import torch
from conformance_cases import (
    DTYPES,
    VARIANTS,
    Case,
    attention_problems,
    bits,
    cross_attention_cases,
    flat_indices,
    inverse_of,
    make_qkv,
    meta_problems,
    pack_cases,
    reference_attention,
    route,
    self_attention_cases,
    torch_gather,
    torch_scatter,
)
from varlen_torch_provider import make_torch_provider, needs_interpreter

SELF, CROSS, PACK = self_attention_cases(), cross_attention_cases(), pack_cases()
# The CPU subset of the attention grid: upstream shapes and edge cases that run fast on the stand-in.
CPU_ATTENTION = (
    "small_c2", "all_valid_b1", "zero_txt_one_batch", "bs1_zero_txt", "right_padding", "left_padding",
    "single_token_gap", "masked_row_mid_batch", "masked_batch", "small_c2_img_over_joint",
    "zero_txt_one_batch_img_over_txt", "gqa_mqa_over_joint",
)  # fmt: skip
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def params(cases: list[Case], dtypes=DTYPES) -> list:
    return [pytest.param(case, dtype, id=f"{case.name}-{DTYPE_NAME[dtype]}") for case in cases for dtype in dtypes]


def build_variants(provider, device_type: str, loaded: dict | None = None) -> dict:
    """Every variant's op group over ``provider``; ``loaded`` supplies the ones ``attn_dispatch.load`` built."""
    from attn_dispatch_varlen_diffusion.attention import build_ops

    loaded = loaded or {}
    return {
        v.name: loaded.get(v.name)
        or build_ops(
            provider,
            general_strategy=v.strategy,
            zero_copy=v.zero_copy,
            pack_queries=v.pack_queries,
            device_type=device_type,
        )
        for v in VARIANTS
    }


def run_attention(variants: dict, case: Case, dtype: torch.dtype, device: str) -> list[str]:
    """Every variant on one case: what each got wrong, named by variant and route."""
    mask = case.mask(device)
    q, k, v = make_qkv(case, dtype, device)
    references, failures = {}, []
    for variant in VARIANTS:
        ops = variants[variant.name]
        zeroing = variant.zeroes_masked_queries
        if zeroing not in references:
            references[zeroing] = reference_attention(
                q, k, v, mask, softmax_scale=case.softmax_scale, zero_masked_queries=zeroing
            )
        meta = ops.build_mask_meta(mask)
        out = ops.masked_attention(q, k, v, meta, softmax_scale=case.softmax_scale)
        problems = attention_problems(out, *references[zeroing], dtype)
        if device != "cpu":  # the bound call from the metadata's cache (on CPU: the same closure again)
            again = ops.masked_attention(q, k, v, meta, softmax_scale=case.softmax_scale)
            if not torch.equal(bits(again), bits(out)):
                problems.append("the second call (the bound call from the metadata's cache) differs from the first")
        failures += [f"{variant.name} [{route(meta, case.cross)}]: {p}" for p in problems]
    return failures


def run_pack(case: Case, dtype: torch.dtype, device: str) -> list[str]:
    """Gather (3 and 2 sources) and scatter against torch, bit for bit; on the GPU also the bound launches
    (off CUDA ``rows_launch.bind_*`` call the same plain functions: ``test_kernels.py``)."""
    from attn_dispatch_flash.rows import gather_rows, scatter_rows
    from attn_dispatch_flash.rows_launch import bind_gather, bind_scatter

    mask = case.mask(device)
    q, k, v = make_qkv(case, dtype, device)
    indices = flat_indices(mask)
    failures = []
    for name, group in (("Q/K/V", (q, k, v)), ("K/V", (k, v))):
        want = torch_gather(group, indices)
        results = {"gather_rows": gather_rows(group, indices)}
        if device != "cpu":
            results["bind_gather"] = bind_gather(group, indices)(*group)
        for how, got in results.items():
            if got.shape != want.shape or not torch.equal(bits(got), bits(want)):
                failures.append(f"{how} of {name}: differs from index_select")
    batch, seqlen = mask.shape
    gen = torch.Generator(device=device).manual_seed(1)
    packed = torch.randn(indices.numel(), case.heads, case.head_dim, generator=gen, dtype=dtype, device=device)
    inverse = inverse_of(indices, batch * seqlen)
    want = torch_scatter(packed, indices, batch, seqlen)
    results = {"scatter_rows": scatter_rows(packed, inverse, batch, seqlen)}
    if device != "cpu":
        results["bind_scatter"] = bind_scatter(packed, inverse, batch, seqlen)(packed)
    for how, got in results.items():
        if got.shape != want.shape or not torch.equal(bits(got), bits(want)):
            failures.append(f"{how}: differs from zeros + index_copy_")
        elif not torch.equal(bits(got[~mask]), bits(torch.zeros_like(got[~mask]))):
            failures.append(f"{how}: padded rows are not exactly zero")
    return failures


def run_meta(variants: dict, case: Case, device: str) -> list[str]:
    mask = case.mask(device)
    failures = []
    for variant in VARIANTS:
        meta = variants[variant.name].build_mask_meta(mask)
        failures += [f"{variant.name} [{meta.strategy.value}]: {p}" for p in meta_problems(meta, mask)]
    return failures


# GPU: attn_dispatch.load("cuda").
@pytest.fixture(scope="module")
def gpu_variants():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from attn_dispatch_varlen_diffusion import NAME
    from attn_dispatch_varlen_diffusion.attention import STRATEGY_ENV

    import attn_dispatch

    loaded, provider = {}, None
    try:
        for variant in VARIANTS:
            if not variant.loaded:
                continue
            with pytest.MonkeyPatch.context() as env:
                env.setenv(STRATEGY_ENV, variant.strategy)
                ops = attn_dispatch.load("cuda", refresh=True)
            if ops.resolutions["masked_attention"].plugin != NAME:  # the reference against itself proves nothing
                pytest.skip(f"{NAME} does not provide masked_attention here: {ops.summary()}")
            group = ops.masked_attention.__self__  # the plugin's op group, as registered
            assert group.general_strategy.value == variant.strategy, ops.resolutions["masked_attention"].note
            loaded[variant.name], provider = ops, group.provider
    finally:
        attn_dispatch.reset()
    return build_variants(provider, "cuda", loaded)


@pytest.fixture(scope="module")
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return "cuda"


def _report(failures: list[str], case: Case, dtype: torch.dtype) -> None:
    assert not failures, f"{case.describe()} {DTYPE_NAME.get(dtype, dtype)}:\n" + "\n".join(failures)


@pytest.mark.cuda
@pytest.mark.conformance
@pytest.mark.parametrize(("case", "dtype"), params(SELF))
def test_gpu_self_attention(gpu_variants, case, dtype):
    """test_varlen_uspattn_equivalence's shapes (and the rest of the grid): valid rows within FA tolerance,
    masked rows by each strategy's contract (exact zeros under qkv_pack), no-key rows exact zeros."""
    with torch.inference_mode():
        _report(run_attention(gpu_variants, case, dtype, "cuda"), case, dtype)


@pytest.mark.cuda
@pytest.mark.conformance
@pytest.mark.parametrize(("case", "dtype"), params(CROSS))
def test_gpu_cross_attention(gpu_variants, case, dtype):
    with torch.inference_mode():
        _report(run_attention(gpu_variants, case, dtype, "cuda"), case, dtype)


@pytest.mark.cuda
@pytest.mark.conformance
@pytest.mark.parametrize(("case", "dtype"), params(PACK))
def test_gpu_pack_scatter_bit_exact(gpu, case, dtype):
    """test_varlen_pack_pad: the fused gather and scatter are pure copies (torch.equal, bit patterns)."""
    _report(run_pack(case, dtype, gpu), case, dtype)


@pytest.mark.cuda
@pytest.mark.conformance
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in PACK])
def test_gpu_mask_meta_exact(gpu_variants, case):
    """build_mask_meta's indices / cu_seqlens / inverse map (upstream build_inv_indices) against torch."""
    _report(run_meta(gpu_variants, case, "cuda"), case, "meta")


# CPU: the Triton interpreter and the torch stand-in provider.
@pytest.fixture(scope="module")
def cpu_variants():
    return build_variants(make_torch_provider(), "cpu")


@needs_interpreter
@pytest.mark.parametrize(("case", "dtype"), params([c for c in PACK if c.on_cpu]))
def test_cpu_pack_scatter_bit_exact(case, dtype):
    _report(run_pack(case, dtype, "cpu"), case, dtype)


@needs_interpreter
@pytest.mark.parametrize(
    ("case", "dtype"),
    params([c for c in SELF + CROSS if c.name in CPU_ATTENTION], (torch.bfloat16,))
    + params([c for c in SELF if c.name == "small_c2"], (torch.float16,)),
)
def test_cpu_masked_attention(cpu_variants, case, dtype):
    _report(run_attention(cpu_variants, case, dtype, "cpu"), case, dtype)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in PACK if c.on_cpu])
def test_cpu_mask_meta_exact(cpu_variants, case):
    _report(run_meta(cpu_variants, case, "cpu"), case, "meta")


def test_grid_reaches_every_route(cpu_variants):
    """The attention grid with its variants takes every path bind_call lays out (metadata only)."""
    routes = {
        route(cpu_variants[v.name].build_mask_meta(case.mask()), case.cross) for case in SELF + CROSS for v in VARIANTS
    }
    assert routes == {
        "no valid key: zeros", "self: pack Q/K/V, scatter", "self: pack K/V", "self: pack K/V, zero masked rows",
        "self: zero-copy", "self: zero-copy, seqused_q", "cross: pack K/V", "cross: zero-copy",
    }  # fmt: skip


@pytest.mark.parametrize(
    "name", ["zero_txt_one_batch", "masked_row_mid_batch", "gqa_h24_kv1", "softmax_scale", "gqa_mqa_over_joint"]
)
def test_reference_matches_the_original_path(name):
    """The float32 reference means what attn_dispatch.reference.masked (SDPA) means, on every row that
    has a visible key (float32 inputs, so only summation order differs)."""
    from attn_dispatch.reference import masked as original

    case = next(c for c in SELF + CROSS if c.name == name)
    mask = case.mask()
    q, k, v = make_qkv(case, torch.float32, "cpu")
    want = original.masked_attention(q, k, v, original.build_mask_meta(mask), softmax_scale=case.softmax_scale)
    got, zero_rows = reference_attention(q, k, v, mask, softmax_scale=case.softmax_scale)
    assert zero_rows.equal(~mask.any(dim=1, keepdim=True).expand_as(zero_rows))
    torch.testing.assert_close(got[~zero_rows], want[~zero_rows], rtol=1e-5, atol=1e-5)
    zeroing, zero_rows = reference_attention(q, k, v, mask, softmax_scale=case.softmax_scale, zero_masked_queries=True)
    if not case.cross:
        assert zero_rows.equal(~mask.any(dim=1, keepdim=True) | ~mask) and not zeroing[~mask].any()
