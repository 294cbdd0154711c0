"""attn_dispatch.direct_op: an op registered from annotations runs its function, traces through its fake
implementation without a graph break, and declares the arguments it writes."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from attn_dispatch import direct_op


def _scaled_into(x: torch.Tensor, out: torch.Tensor, scale: float, bias: Optional[torch.Tensor]) -> None:
    torch.mul(x, scale, out=out)
    if bias is not None:
        out.add_(bias)


def _scaled_into_fake(x, out, scale, bias) -> None:
    return None


def _doubled(x: torch.Tensor, times: int) -> torch.Tensor:
    return x * 2 * times


def _doubled_fake(x, times) -> torch.Tensor:
    return torch.empty_like(x)


scaled_into = direct_op.register("attn_dispatch_test::scaled_into", _scaled_into, fake=_scaled_into_fake, mutates_args=("out",))
doubled = direct_op.register("attn_dispatch_test::doubled", _doubled, fake=_doubled_fake)


def test_schema_comes_from_the_annotations_and_names_the_written_argument():
    schema = str(scaled_into._schema)
    assert "Tensor(a1!) out" in schema and "Tensor? bias" in schema and schema.endswith("-> ()")
    assert str(doubled._schema).endswith("-> Tensor")


def test_the_op_runs_the_function():
    x, out = torch.arange(4.0), torch.zeros(4)
    scaled_into(x, out, 3.0, torch.ones(4))
    assert torch.equal(out, x * 3 + 1)
    assert torch.equal(doubled(x, 2), x * 4)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_without_a_graph_break_and_writes_out(backend):
    def layer(x, out):
        scaled_into(x * 1.5, out, 2.0, None)
        return doubled(out, 1) + 1

    torch._dynamo.reset()
    x, out, expected_out = torch.randn(8), torch.zeros(8), torch.zeros(8)
    expected = layer(x, expected_out)
    explain = torch._dynamo.explain(layer)(x, torch.zeros(8))
    assert explain.graph_break_count == 0
    got = torch.compile(layer, backend=backend, fullgraph=True)(x, out)
    assert torch.equal(got, expected) and torch.equal(out, expected_out)


def test_opcheck():
    x = torch.randn(5)
    torch.library.opcheck(scaled_into, (x, torch.zeros(5), 0.5, torch.randn(5)))
    torch.library.opcheck(doubled, (x, 3))
