"""The bound launch hands Triton's launcher every kernel parameter in the kernel's own order (what
``JITFunction.run`` passes), with the same values it compiled for. Checked on CPU with a recording
stand-in for the compiled kernel and its launcher; the GPU test compares real launches byte for byte."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
import triton.runtime
from attn_dispatch_flash import rows, rows_launch


class Recorder:
    """A kernel whose ``warmup`` returns a fake compiled kernel; both record what they are given."""

    def __init__(self, params: list[str], arg_count: int | None = None) -> None:
        self.params, self.warmed, self.launches = params, [], []
        recorder = self

        class Launcher:
            arg_annotations = [None] * (len(params) if arg_count is None else arg_count)

            def __call__(self, gx, gy, gz, stream, function, packed, metadata, enter, exit_, *args):
                recorder.launches.append({"grid": (gx, gy, gz), "stream": stream, "function": function, "args": args})

        self.compiled = types.SimpleNamespace(_init_handles=lambda: None, run=Launcher(), function="fn", packed_metadata="pm")

    def warmup(self, *args, grid, num_warps, **constexprs):
        self.warmed.append(dict(zip(self.params, args), **constexprs))
        return self.compiled

    def named(self, launch_index: int) -> dict:
        return dict(zip(self.params, self.launches[launch_index]["args"]))


def params_of(kernel) -> list[str]:
    fn = getattr(kernel, "fn", kernel)
    return list(inspect.signature(fn).parameters)


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(rows_launch, "_direct_launches", lambda device: True)
    driver = triton.runtime.driver
    monkeypatch.setattr(driver, "_active", types.SimpleNamespace(get_current_stream=lambda index: f"stream{index}"))
    return monkeypatch


def test_gather_launch_passes_every_parameter_in_order(recording):
    rec = Recorder(params_of(rows._gather_rows_kernel))
    recording.setattr(rows, "_gather_rows_kernel", rec)
    k, v = torch.randn(2, 5, 2, 3, 16).bfloat16().unbind(2)  # strided slices of one K/V projection
    indices = torch.tensor([0, 2, 3, 7], dtype=torch.int32)
    gather = rows_launch.bind_gather((k, v), indices)
    out = gather(k, v)
    got = rec.named(0)
    assert got["src0"] is k and got["src1"] is v and got["dst"] is out and got["indices"] is indices
    assert (got["n_rows"], got["plane"], got["seqlen"]) == (4, 4 * 3 * 16, 5)
    assert (got["stride_b"], got["stride_s"], got["stride_h"], got["stride_d"]) == k.stride()
    assert (got["NUM_SRC"], got["HEADS"], got["HEAD_DIM"], got["BLOCK_D"]) == (2, 3, 16, 16)
    assert got["BLOCK_ROWS"] == rows.BLOCK_ROWS and got["HEADS_INNER"] == rows.HEADS_INNER
    warmed = rec.warmed[0]
    assert all(warmed[name] == got[name] for name in rec.params if not isinstance(got[name], torch.Tensor))
    assert rec.launches[0]["grid"] == (triton.cdiv(4, rows.BLOCK_ROWS) * 3, 1, 1)
    assert out.shape == (2, 4, 3, 16) and out.dtype == k.dtype


def test_scatter_launch_passes_every_parameter_in_order(recording):
    rec = Recorder(params_of(rows._scatter_rows_kernel))
    recording.setattr(rows, "_scatter_rows_kernel", rec)
    packed = torch.randn(4, 3, 16).bfloat16()
    inverse = torch.tensor([0, -1, 1, 2, -1, -1, -1, 3, -1, -1], dtype=torch.int32)
    out = rows_launch.bind_scatter(packed, inverse, 2, 5)(packed)
    got = rec.named(0)
    assert got["src"] is packed and got["dst"] is out and got["inverse"] is inverse and got["n_dst_rows"] == 10
    assert (got["stride_row"], got["stride_h"], got["stride_d"]) == packed.stride()
    assert (got["HEADS"], got["HEAD_DIM"], got["BLOCK_D"]) == (3, 16, 16) and out.shape == (2, 5, 3, 16)


def test_a_launcher_of_another_arity_is_not_used(recording, caplog):
    rec = Recorder(params_of(rows._gather_rows_kernel), arg_count=5)
    recording.setattr(rows, "_gather_rows_kernel", rec)
    called = []
    recording.setattr(rows_launch, "gather_rows", lambda sources, indices: called.append(1) or "plain")
    k = torch.randn(2, 5, 3, 16).bfloat16()
    gather = rows_launch.bind_gather((k, k), torch.tensor([1], dtype=torch.int32))
    assert gather(k, k) == "plain" and called == [1] and rec.launches == []
    assert "launching through Triton" in caplog.text
