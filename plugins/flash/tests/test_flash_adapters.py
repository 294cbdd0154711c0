"""CPU: the adapters of attn_dispatch_flash (sgl_kernel, upstream FA3, FA4, vllm's raw ops) against stand-in
modules with those packages' Python signatures (the H200 run exercises vllm's FA3 for real)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import attn_dispatch_flash as flash_providers
from attn_dispatch_flash import FlashArgs

Q, K, V = (torch.zeros(3, 4, 8) for _ in range(3))
OUT = torch.empty(3, 4, 8)
TABLE, SEQLENS, CU = torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
PAGED = dict(cu_seqlens_q=CU, seqused_k=SEQLENS, max_seqlen_q=2, max_seqlen_k=64, page_table=TABLE, softmax_scale=0.5, causal=True,
             window_size=(16, 0), softcap=0.0, num_splits=0, pack_gqa=None)  # fmt: skip
PACKED = dict(cu_seqlens_q=CU, cu_seqlens_k=CU, max_seqlen_q=2, max_seqlen_k=2, softmax_scale=0.5, causal=True)
METADATA = dict(
    batch_size=2, max_seqlen_q=1, max_seqlen_k=64, num_heads=4, num_kv_heads=2, head_dim=8, head_dim_v=8,
    cache_seqlens=SEQLENS, cu_seqlens_q=CU, page_size=16, dtype=torch.bfloat16, causal=True, window_size=(16, 0),
    softcap=50.0, num_splits=0, pack_gqa=None,
)  # fmt: skip


def fa3_module(
    *, with_out: bool, with_ver: bool = False, with_metadata: bool = True, with_leftpad: bool = True
) -> tuple[types.ModuleType, list]:
    """A module with FA3's Python wrappers' signatures (sglang-kernel 0.4.10 / upstream hopper), recording calls."""
    calls: list[tuple[str, dict]] = []
    extra = ", ver=3" if with_ver else ""
    out_arg = ", out=None" if with_out else ""
    leftpad_arg = " cache_leftpad=None," if with_leftpad else ""
    source = f"""
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
        cache_seqlens=None, cache_batch_idx=None,{leftpad_arg} page_table=None, cu_seqlens_q=None,
        cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None, q_descale=None, k_descale=None,
        v_descale=None, softmax_scale=None, causal=False, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
        rotary_interleaved=True, scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
        return_softmax_lse=False{extra}{out_arg}):
    calls.append(("with_kvcache", dict(locals())))
    return "result"

def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
        seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
        window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
        sm_margin=0, return_softmax_lse=False{extra}{out_arg}):
    calls.append(("varlen", dict(locals())))
    return "result"
"""
    if with_metadata:
        source += """
def get_scheduler_metadata(batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_heads_k, headdim, cache_seqlens,
        qkv_dtype=None, headdim_v=None, cu_seqlens_q=None, cu_seqlens_k_new=None, cache_leftpad=None, page_size=None,
        max_seqlen_k_new=0, causal=False, window_size=(-1, -1), attention_chunk=0, has_softcap=False, num_splits=0,
        pack_gqa=None, sm_margin=0):
    calls.append(("metadata", dict(locals())))
    return "metadata"
"""
    module = types.ModuleType("fa3_standin")
    module.calls = calls
    exec(source, module.__dict__)
    return module, calls


def install_sgl_kernel(monkeypatch, module):
    package = types.ModuleType("sgl_kernel")
    package.flash_attn = module
    monkeypatch.setitem(sys.modules, "sgl_kernel", package)
    monkeypatch.setitem(sys.modules, "sgl_kernel.flash_attn", module)


def test_sgl_kernel_maps_paged_and_packed_calls(monkeypatch):
    module, calls = fa3_module(with_out=True, with_ver=True)
    install_sgl_kernel(monkeypatch, module)
    provider, reason = flash_providers.probe()
    assert provider.name == "sgl_kernel" and reason == ""
    assert provider.writes_out and provider.scheduler_metadata is not None
    assert provider.paged_seqlen_k_from_page_table  # its paged wrapper takes no max_seqlen_k
    # this fake's varlen wrapper has no scheduler_metadata keyword: packed calls schedule themselves
    varlen_keywords = flash_providers.fa3.keywords_of(module.flash_attn_varlen_func)
    assert provider.varlen_takes_metadata == ("scheduler_metadata" in varlen_keywords)

    provider.fwd(Q, K, V, out=OUT, scheduler_metadata="meta", **PAGED)
    name, args = calls[-1]
    assert name == "with_kvcache"
    assert args["cache_seqlens"] is SEQLENS and args["page_table"] is TABLE and args["out"] is OUT
    assert args["scheduler_metadata"] == "meta" and args["window_size"] == (16, 0) and args["ver"] == 3
    assert args["max_seqlen_q"] == 2 and args["causal"] is True and args["softmax_scale"] == 0.5

    provider.fwd(Q, K, V, out=OUT, **PACKED)
    name, args = calls[-1]
    assert name == "varlen" and args["out"] is OUT and args["cu_seqlens_k"] is CU and args["num_splits"] == 0

    assert provider.scheduler_metadata(**METADATA) == "metadata"
    name, args = calls[-1]
    assert (args["batch_size"], args["max_seqlen_q"], args["max_seqlen_k"], args["num_heads"], args["num_heads_k"], args["headdim"]) == (2, 1, 64, 4, 2, 8)
    assert args["cache_seqlens"] is SEQLENS and args["qkv_dtype"] is torch.bfloat16 and args["headdim_v"] == 8
    assert args["page_size"] == 16 and args["window_size"] == (16, 0) and args["has_softcap"] is True
    assert args["cache_leftpad"] is None  # not a padded batch


@pytest.mark.parametrize("what", ["no out", "no metadata", "no cache_leftpad"])
def test_old_sgl_kernel_is_passed_over_with_a_reason(monkeypatch, what):
    module, _ = fa3_module(
        with_out=what != "no out", with_metadata=what != "no metadata", with_leftpad=what != "no cache_leftpad"
    )  # fmt: skip
    install_sgl_kernel(monkeypatch, module)
    provider, reason = flash_providers.probe(("sgl_kernel",))
    assert provider is None
    missing = {"no out": "lacks out", "no metadata": "get_scheduler_metadata", "no cache_leftpad": "lacks cache_leftpad"}[what]
    assert "sgl_kernel: ImportError" in reason and missing in reason


def test_upstream_fa3_without_cache_leftpad_is_passed_over(monkeypatch):
    module, _ = fa3_module(with_out=False, with_leftpad=False)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    provider, reason = flash_providers.probe(("flash_attn_interface",))
    assert provider is None
    assert "flash_attn_interface.flash_attn_with_kvcache lacks cache_leftpad" in reason


# Batch mode over left-padded rows: [B, S, H, D] tensors, each row's keys [leftpad_k[b], seqused_k[b]).
Q4, K4, V4, OUT4 = (torch.zeros(2, 5, 4, 8) for _ in range(4))
STARTS, ENDS = torch.tensor([3, 0], dtype=torch.int32), torch.tensor([5, 4], dtype=torch.int32)
BATCH = dict(max_seqlen_q=5, max_seqlen_k=5, softmax_scale=0.5, causal=True, window_size=(3, 0), softcap=2.0,
             seqused_k=ENDS, leftpad_k=STARTS)  # fmt: skip


@pytest.mark.parametrize("package", ["sgl_kernel", "flash_attn_interface"])
def test_wrappers_route_leftpad_k_to_flash_attn_with_kvcache(monkeypatch, package):
    module, calls = fa3_module(with_out=package == "sgl_kernel", with_ver=package == "sgl_kernel")
    if package == "sgl_kernel":
        install_sgl_kernel(monkeypatch, module)
    else:
        monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    provider, _ = flash_providers.probe((package,))
    out = OUT4 if provider.writes_out else None
    result = provider.bind(FlashArgs(scheduler_metadata="meta", **BATCH))(Q4, K4, V4, out)
    assert result == "result"
    name, args = calls[-1]
    assert name == "with_kvcache" and args["q"] is Q4 and args["k_cache"] is K4 and args["v_cache"] is V4
    assert args["cache_seqlens"] is ENDS and args["cache_leftpad"] is STARTS and args["scheduler_metadata"] == "meta"
    assert args["page_table"] is None and args["cu_seqlens_q"] is None and args["max_seqlen_q"] is None
    assert args["causal"] is True and args["window_size"] == (3, 0) and args["softcap"] == 2.0 and args["softmax_scale"] == 0.5
    assert args.get("out") is out and args.get("ver", 3) == 3
    provider.fwd(Q4, K4, V4, out=out, **BATCH)  # no metadata: the wrapper makes none
    assert calls[-1][0] == "with_kvcache" and calls[-1][1]["scheduler_metadata"] is None

    for extra in (dict(page_table=TABLE), dict(cu_seqlens_q=CU), dict(cu_seqlens_k=CU)):
        with pytest.raises(NotImplementedError, match="leftpad_k"):
            provider.bind(FlashArgs(**BATCH, **extra))

    assert provider.scheduler_metadata(**{**METADATA, "cu_seqlens_q": None, "page_size": None, "leftpad_k": STARTS}) == "metadata"
    name, args = calls[-1]
    assert name == "metadata" and args["cache_leftpad"] is STARTS and args["cache_seqlens"] is SEQLENS
    assert args["cu_seqlens_q"] is None and args["page_size"] is None


def test_upstream_fa3_returns_a_fresh_tensor_and_refuses_out(monkeypatch):
    module, calls = fa3_module(with_out=False)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    provider, _ = flash_providers.probe(("flash_attn_interface",))
    assert provider.name == "flash_attn_interface" and not provider.writes_out
    assert provider.paged_seqlen_k_from_page_table
    assert not provider.varlen_takes_metadata and not provider.takes_metadata(packed=True)  # its varlen wrapper takes none
    assert provider.takes_metadata(packed=False)
    assert "copy into out" in provider.describe() and "(paged only)" in provider.describe()
    assert provider.fwd(Q, K, V, scheduler_metadata="meta", **PAGED) == "result"
    name, args = calls[-1]
    assert name == "with_kvcache" and args["cache_seqlens"] is SEQLENS and args["scheduler_metadata"] == "meta"
    with pytest.raises(TypeError, match="cannot write into `out`"):
        provider.fwd(Q, K, V, out=OUT, **PAGED)
    provider.scheduler_metadata(**METADATA)
    assert calls[-1][0] == "metadata"


def test_fa4_passes_out_and_translates_windows(monkeypatch):
    seen = {}

    def _flash_attn_fwd(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None,
                        max_seqlen_k=None, page_table=None, softmax_scale=None, causal=False, softcap=None,
                        window_size_left=None, window_size_right=None, learnable_sink=None, num_splits=1, pack_gqa=None,
                        return_lse=False, out=None, lse=None):  # fmt: skip
        seen.update(locals())
        return out, None

    modules = {name: types.ModuleType(name) for name in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface")}
    modules["flash_attn.cute.interface"]._flash_attn_fwd = _flash_attn_fwd
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    provider, _ = flash_providers.probe(flash_providers.probe_order("sm100"))
    assert provider.name == "fa4" and provider.writes_out and provider.scheduler_metadata is None
    assert provider.fwd(Q, K, V, out=OUT, **{**PAGED, "window_size": (-1, -1), "softcap": 0.0}) is OUT
    assert seen["window_size_left"] is None and seen["window_size_right"] is None and seen["softcap"] is None
    assert seen["page_table"] is TABLE and seen["seqused_k"] is SEQLENS and seen["out"] is OUT
    provider.fwd(Q, K, V, out=OUT, **PAGED)
    assert (seen["window_size_left"], seen["window_size_right"]) == (16, 0)
    with pytest.raises(NotImplementedError):
        provider.fwd(Q, K, V, out=OUT, scheduler_metadata="meta", **PAGED)


# vllm's FA3 raw op schemas (torch.ops._vllm_fa3_C, vllm 0.33.0), argument names in order.
VLLM_FWD_ARGS = (
    "q k v k_new v_new q_v out cu_seqlens_q cu_seqlens_k cu_seqlens_k_new seqused_q seqused_k max_seqlen_q "
    "max_seqlen_k page_table kv_batch_idx leftpad_k rotary_cos rotary_sin seqlens_rotary q_descale k_descale "
    "v_descale softmax_scale is_causal window_size_left window_size_right softcap is_rotary_interleaved "
    "scheduler_metadata num_splits pack_gqa sm_margin s_aux cp_world_size cp_rank cp_tot_seqused_k"
).split()
VLLM_METADATA_ARGS = (
    "batch_size max_seqlen_q max_seqlen_k num_heads num_heads_k headdim headdim_v qkv_dtype seqused_k "
    "cu_seqlens_q cu_seqlens_k cu_seqlens_k_new seqused_q leftpad_k page_size max_seqlen_k_new is_causal "
    "window_size_left window_size_right has_softcap num_splits pack_gqa sm_margin"
).split()


def raw_ops() -> tuple[types.SimpleNamespace, list]:
    calls: list[tuple[str, dict]] = []

    def fwd(*args):
        assert len(args) == len(VLLM_FWD_ARGS)
        calls.append(("fwd", dict(zip(VLLM_FWD_ARGS, args))))
        return (args[6] if args[6] is not None else "fresh", "lse", None, None)

    def get_scheduler_metadata(*args):
        assert len(args) == len(VLLM_METADATA_ARGS)
        calls.append(("metadata", dict(zip(VLLM_METADATA_ARGS, args))))
        return "metadata"

    return types.SimpleNamespace(fwd=fwd, get_scheduler_metadata=get_scheduler_metadata), calls


def test_vllm_raw_ops_get_every_argument_in_its_place():
    ops, calls = raw_ops()
    provider = flash_providers.raw_fa3_ops_provider("vllm_fa3", ops)
    assert provider.writes_out and provider.has_seqused_q and not provider.paged_seqlen_k_from_page_table

    call = provider.bind(scheduler_metadata="meta", **PAGED)
    assert call(Q, K, V, OUT) is OUT and provider.fwd(Q, K, V, out=OUT, scheduler_metadata="meta", **PAGED) is OUT
    bound, direct = calls[0][1], calls[1][1]
    assert bound.keys() == direct.keys() and all(bound[n] is direct[n] or bound[n] == direct[n] for n in bound)
    expected = dict(q=Q, k=K, v=V, out=OUT, cu_seqlens_q=CU, cu_seqlens_k=None, seqused_k=SEQLENS, seqused_q=None,
                    max_seqlen_q=2, max_seqlen_k=64, page_table=TABLE, softmax_scale=0.5, is_causal=True,
                    window_size_left=16, window_size_right=0, softcap=0.0, scheduler_metadata="meta", num_splits=0,
                    pack_gqa=None, is_rotary_interleaved=True, sm_margin=0, cp_world_size=1, cp_rank=0)  # fmt: skip
    for name, value in expected.items():
        assert bound[name] is value or bound[name] == value, name
    unset = set(VLLM_FWD_ARGS) - set(expected)
    assert all(bound[name] is None for name in unset), {n: bound[n] for n in unset if bound[n] is not None}

    assert provider.fwd(Q, K, V, **PACKED) == "fresh"
    assert calls[-1][1]["cu_seqlens_k"] is CU and calls[-1][1]["page_table"] is None

    starts = torch.tensor([3, 0], dtype=torch.int32)  # batch mode over left-padded rows: keys [start, seqused_k)
    provider.bind(max_seqlen_q=4, max_seqlen_k=8, softmax_scale=0.5, causal=True, seqused_k=SEQLENS, leftpad_k=starts)(Q, K, V, OUT)
    assert calls[-1][1]["leftpad_k"] is starts and calls[-1][1]["seqused_k"] is SEQLENS and calls[-1][1]["cu_seqlens_q"] is None

    assert provider.scheduler_metadata(**METADATA) == "metadata"
    meta = calls[-1][1]
    assert (meta["batch_size"], meta["num_heads"], meta["num_heads_k"], meta["headdim"], meta["headdim_v"]) == (2, 4, 2, 8, 8)
    assert meta["seqused_k"] is SEQLENS and meta["cu_seqlens_q"] is CU and meta["qkv_dtype"] == torch.bfloat16
    assert (meta["page_size"], meta["is_causal"], meta["window_size_left"], meta["window_size_right"]) == (16, True, 16, 0)
    assert meta["has_softcap"] is True and meta["max_seqlen_k"] == 64 and meta["cu_seqlens_k"] is None
    assert meta["leftpad_k"] is None and meta["seqused_q"] is None and meta["cu_seqlens_k_new"] is None

    # A padded batch's: the key starts in the leftpad_k position, the ends as seqused_k, no cu_seqlens_q.
    provider.scheduler_metadata(**{**METADATA, "cu_seqlens_q": None, "page_size": None, "leftpad_k": starts})
    meta = calls[-1][1]
    assert meta["leftpad_k"] is starts and meta["seqused_k"] is SEQLENS and meta["cu_seqlens_q"] is None
    assert meta["page_size"] is None and meta["seqused_q"] is None and meta["cu_seqlens_k_new"] is None


def test_generic_bind_is_fwd_with_the_arguments_fixed():
    """A provider given only a keyword ``fwd`` (the stand-ins) binds by fixing every FlashArgs field."""
    provider = flash_providers.FlashProvider("stub", 3, lambda q, k, v, **kw: (q, kw), None, writes_out=True, has_seqused_q=False)
    for call in (provider.bind(**PACKED), provider.bind(FlashArgs(**PACKED))):
        q, kw = call(Q, K, V, OUT)
        assert q is Q and kw.pop("out") is OUT
        assert kw.keys() == set(FlashArgs._fields) and all(kw[name] is value for name, value in PACKED.items())
        assert kw["window_size"] == (-1, -1) and kw["scheduler_metadata"] is None  # FA3's defaults
    with pytest.raises(TypeError, match="not both"):
        provider.bind(FlashArgs(**PACKED), causal=False)


def test_adapters_bind_once_and_fwd_is_bind_then_call(monkeypatch):
    """``fwd(**fields)`` and ``bind(FlashArgs)(...)`` reach the package the same way (sgl_kernel stand-in)."""
    module, calls = fa3_module(with_out=True)
    install_sgl_kernel(monkeypatch, module)
    provider, _ = flash_providers.probe(("sgl_kernel",))
    call = provider.bind(FlashArgs(scheduler_metadata="meta", **PAGED))
    call(Q, K, V, OUT)
    call(Q, K, V, OUT)
    provider.fwd(Q, K, V, out=OUT, scheduler_metadata="meta", **PAGED)
    assert [name for name, _ in calls] == ["with_kvcache"] * 3
    assert calls[0][1].keys() == calls[2][1].keys()
    assert all(calls[0][1][n] is calls[2][1][n] or calls[0][1][n] == calls[2][1][n] for n in calls[0][1])
