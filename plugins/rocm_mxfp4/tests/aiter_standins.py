"""CPU (and CUDA) stand-ins for the aiter kernels the rocm_mxfp4 plugin calls, in plain torch.

They implement aiter's documented contract, not its speed:

- MXFP4 (OCP MX): e2m1 elements in blocks of 32 sharing an E8M0 scale 2**(s - 127). aiter's "even"
  scale: round amax up at 1.75 * 2**k (``(bits + 0x200000) & 0xFF800000``), then ``e = floor(log2) - 2``
  clamped to [-127, 127]; elements round to nearest even on the e2m1 grid and saturate at 6.
  Element 2i is the low nibble of byte i.
- ``batched_gemm_a16wfp4``: x quantized to MXFP4 along K (prequant), y = x @ w.T accumulated in fp32,
  written through y's strides.
- ``fused_flatten_mxfp4_quant`` / ``fused_flatten_fp8_group_quant``: flatten (M, N1, N2) to (M, N1 * N2)
  and quantize rows; MXFP4 scales come back column-major like aiter's.

Each stand-in counts as one kernel launch: :class:`LaunchRecorder` (a TorchDispatchMode) records its
name and hides the aten ops it runs inside, and on a GPU :func:`kernels_by_origin` tells the glue's
kernels from those launched inside a stand-in's ``standin::<name>`` profiler range.
"""

from __future__ import annotations

import functools
import re
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attn_dispatch_rocm_mxfp4 import Kernels

MXFP4_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code 0..7; bit 3 is the sign
PROFILER_PREFIX = "standin::"


# --- recording which ops and kernels a path launches ------------------------------------------------


class LaunchRecorder(TorchDispatchMode):
    """Records every aten op the glue runs, and each stand-in kernel as one launch (not its insides)."""

    active: LaunchRecorder | None = None

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[str] = []
        self._inside_kernel = 0

    def __enter__(self):
        LaunchRecorder.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        LaunchRecorder.active = None
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside_kernel:
            self.launches.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))

    def copies(self) -> list[str]:
        """Launches that move data without computing: what the strided path must not have."""
        return [name for name in self.launches if name in COPY_OPS]


COPY_OPS = {"copy_", "_to_copy", "clone", "cat"}  # aten ops that only move bytes (contiguous() is a clone)


def standin_kernel(name: str) -> Callable[[Callable], Callable]:
    """Mark a stand-in as one kernel launch of ``name`` (for LaunchRecorder and torch.profiler)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def launch(*args, **kwargs):
            recorder = LaunchRecorder.active
            if recorder is not None:
                recorder.launches.append(name)
                recorder._inside_kernel += 1
            try:
                with torch.profiler.record_function(PROFILER_PREFIX + name):
                    return fn(*args, **kwargs)
            finally:
                if recorder is not None:
                    recorder._inside_kernel -= 1

        return launch

    return wrap


# --- MXFP4 ------------------------------------------------------------------------------------------


def e8m0_exponent(amax: torch.Tensor) -> torch.Tensor:
    """aiter's "even" shared exponent for blocks whose largest magnitude is ``amax`` (float32, >= 0)."""
    bits = amax.to(torch.float32).view(torch.int32)
    rounded = (bits + 0x200000) & 0x7F800000  # amax >= 0, so the sign bit of 0xFF800000 is 0 anyway
    floor_log2 = (rounded >> 23) - 127  # rounded is a power of two (or 0 -> -127, clamped below)
    return (floor_log2 - 2).clamp(-127, 127)


def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """Round already-scaled float32 values to e2m1 codes (uint8 0..15), nearest-even, saturating at 6."""
    mag = q.abs()
    # The grid's step is 0.5 below 2, 1 in [2, 4), 2 in [4, 6); torch.round rounds half to even.
    value = torch.where(mag < 2, torch.round(mag * 2) / 2, torch.where(mag < 4, torch.round(mag), torch.round(mag / 2) * 2))
    value = value.clamp(max=6.0)
    twice_to_code = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8, device=q.device)
    codes = twice_to_code[(value * 2).to(torch.long)]
    return codes | (torch.signbit(q).to(torch.uint8) << 3)


def mxfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(..., K)`` -> packed e2m1 ``(..., K // 2)`` uint8 and E8M0 scales ``(..., K // 32)`` uint8."""
    *lead, k = x.shape
    assert k % MXFP4_BLOCK == 0, f"K={k} is not a multiple of {MXFP4_BLOCK}"
    blocks = x.to(torch.float32).reshape(*lead, k // MXFP4_BLOCK, MXFP4_BLOCK)
    exponent = e8m0_exponent(blocks.abs().amax(dim=-1, keepdim=True))
    codes = e2m1_codes(blocks * torch.exp2(-exponent.to(torch.float32))).reshape(*lead, k)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent + 127).to(torch.uint8).reshape(*lead, k // MXFP4_BLOCK)


def mxfp4_dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`mxfp4_quantize`, in float32 (E8M0 255 is NaN)."""
    values = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=packed.device)
    low, high = packed & 0xF, packed >> 4
    codes = torch.stack((low, high), dim=-1).flatten(-2)
    elements = values[codes.to(torch.long)]
    *lead, k = elements.shape
    scale = torch.exp2(scales.to(torch.float32) - 127)
    scale = torch.where(scales == 255, torch.nan, scale)
    return (elements.reshape(*lead, k // MXFP4_BLOCK, MXFP4_BLOCK) * scale.unsqueeze(-1)).reshape(*lead, k)


# --- the three kernels ------------------------------------------------------------------------------


@standin_kernel("aiter.batched_gemm_a16wfp4")
def batched_gemm_a16wfp4(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    y: torch.Tensor | None = None,
    config: dict | None = None,
    transpose_bm: bool = False,
    prequant: bool = True,
    y_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    assert prequant and not transpose_bm and y_scale is None, "stand-in covers prequant=True only"
    batch, m, k = x.shape
    assert w.shape[:1] == (batch,) and w.shape[2] * 2 == k and w_scales.shape[2] * MXFP4_BLOCK == k
    x_q = mxfp4_dequantize(*mxfp4_quantize(x))
    w_deq = mxfp4_dequantize(w, w_scales)
    result = torch.bmm(x_q, w_deq.transpose(1, 2))
    if y is None:
        return result.to(dtype)
    assert tuple(y.shape) == (batch, m, w.shape[1]) and y.dtype == dtype
    y.copy_(result)  # element by element through y's strides, as the kernel's stores are
    return y


@standin_kernel("aiter.fused_flatten_mxfp4_quant")
def fused_flatten_mxfp4_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, n1, n2 = x.shape
    assert n2 % MXFP4_BLOCK == 0
    packed, scales = mxfp4_quantize(x.reshape(m, n1 * n2))
    scales_col_major = torch.empty((scales.shape[1], m), dtype=torch.uint8, device=x.device).T
    scales_col_major.copy_(scales)
    return packed, scales_col_major


@standin_kernel("aiter.fused_flatten_fp8_group_quant")
def fused_flatten_fp8_group_quant(
    x: torch.Tensor, group_size: int, dtype_quant: torch.dtype = torch.float8_e4m3fn, transpose_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    m, n1, n2 = x.shape
    assert n2 % group_size == 0
    fp8_max = torch.finfo(dtype_quant).max
    groups = x.to(torch.float32).reshape(m, n1 * n2 // group_size, group_size)
    scales = groups.abs().amax(dim=-1).clamp(min=1e-10) / fp8_max
    values = (groups * (1.0 / scales).unsqueeze(-1)).clamp(-fp8_max, fp8_max).to(dtype_quant)
    if transpose_scale:
        scales = scales.T.contiguous().T
    return values.reshape(m, n1 * n2), scales


def standin_kernels() -> Kernels:
    return Kernels(
        batched_gemm_fp4=batched_gemm_a16wfp4,
        fused_flatten_mxfp4_quant=fused_flatten_mxfp4_quant,
        fused_flatten_fp8_group_quant=fused_flatten_fp8_group_quant,
        provider="aiter stand-ins (torch)",
    )


# --- a fake `aiter` package, so the plugin's real registration path imports the stand-ins ------------


def fake_aiter_modules() -> dict[str, types.ModuleType]:
    """sys.modules entries under aiter's module names, holding the stand-ins."""
    import importlib.machinery

    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        mod.__dict__.update(attrs)
        return mod

    return {
        "aiter": module("aiter"),
        "aiter.ops": module("aiter.ops"),
        "aiter.ops.triton": module("aiter.ops.triton"),
        "aiter.ops.triton.batched_gemm_a16wfp4": module(
            "aiter.ops.triton.batched_gemm_a16wfp4", batched_gemm_a16wfp4=batched_gemm_a16wfp4
        ),
        "aiter.ops.triton.fused_mxfp4_quant": module(
            "aiter.ops.triton.fused_mxfp4_quant", fused_flatten_mxfp4_quant=fused_flatten_mxfp4_quant
        ),
        "aiter.ops.triton.fused_fp8_quant": module(
            "aiter.ops.triton.fused_fp8_quant", fused_flatten_fp8_group_quant=fused_flatten_fp8_group_quant
        ),
    }


@contextmanager
def fake_aiter_installed() -> Iterator[None]:
    """Put the fake aiter in sys.modules for the duration (outside pytest, e.g. the benchmark)."""
    fakes = fake_aiter_modules()
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


# --- test data --------------------------------------------------------------------------------------


def random_mxfp4_weights(
    heads: int, v_dim: int, rank: int, *, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any byte is a valid pair of e2m1 codes; scales near 2**0 keep the products in bf16's range."""
    w = torch.randint(0, 256, (heads, v_dim, rank // 2), dtype=torch.uint8, generator=generator)
    scales = torch.randint(120, 130, (heads, v_dim, rank // MXFP4_BLOCK), dtype=torch.uint8, generator=generator)
    return w.to(device), scales.to(device)


# --- torch.profiler: which GPU kernels the glue launched, apart from the stand-ins' insides ----------

COPY_KERNEL = re.compile(r"copy|memcpy|catarray|concat", re.IGNORECASE)


def kernels_by_origin(prof: torch.profiler.profile) -> tuple[list[str], list[str]]:
    """``(glue, standin)``: device kernels launched outside / inside a ``standin::`` range."""
    glue: list[str] = []
    standin: list[str] = []
    for event in prof.events():
        if not event.kernels:
            continue
        parent, inside = event, False
        while parent is not None and not inside:
            inside = parent.name.startswith(PROFILER_PREFIX)
            parent = parent.cpu_parent
        (standin if inside else glue).extend(kernel.name for kernel in event.kernels)
    return glue, standin


def copy_kernels(names: list[str]) -> list[str]:
    return [name for name in names if COPY_KERNEL.search(name)]
