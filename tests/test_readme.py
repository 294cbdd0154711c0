"""The README's engine snippet runs as written.

The ```python blocks of the section "Using it from an engine" are run in order, in one namespace, exactly
as they stand in README.md (other sections' blocks are sketches with placeholders, e.g. a plugin's
``probe_kernels``). The snippet picks the GPU when there is one, so the same test covers the reference on
CPU and the plugins on the H200 (``-m cuda``); its output is compared with the reference.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from attn_dispatch import reference

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Using it from an engine"


def section_python_blocks(text: str, heading: str) -> list[tuple[int, str]]:
    """The ```python blocks between ``heading`` and the next ``## `` heading, each with the line number
    (1-based) of its first line of code."""
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    body = text[start : end if end != -1 else len(text)]
    first_line = text[:start].count("\n") + 1
    return [
        (first_line + body[: m.start(1)].count("\n"), m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```$", body, flags=re.S | re.M)
    ]


def run_engine_snippet() -> dict:
    """Run the section's blocks as one script; return its namespace."""
    blocks = section_python_blocks(README.read_text(), SECTION)
    assert blocks, f"README.md: no python block under {SECTION!r}"
    namespace: dict = {"__name__": "__readme__"}
    for line, code in blocks:
        # Blank lines in front keep README.md's line numbers in a traceback.
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
    return namespace


def check_against_reference(ns: dict) -> None:
    expected = torch.empty_like(ns["out"])
    reference.paged_attention_out(
        ns["q"], ns["k_cache"], ns["v_cache"], expected, plan=ns["plan"], params=ns["sliding_params"]
    )
    torch.testing.assert_close(ns["out"].float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_engine_snippet_runs_as_written():
    ns = run_engine_snippet()
    assert ns["ops"].resolutions["paged_attention_out"] is not None
    check_against_reference(ns)  # on CPU the reference against itself: still proves the call wrote `out`


@pytest.mark.cuda
def test_engine_snippet_runs_as_written_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ns = run_engine_snippet()
    assert ns["device"] == "cuda"
    check_against_reference(ns)


def test_section_python_blocks_finds_only_that_sections_blocks():
    text = "# t\n## A\n```python\na = 1\n```\n## B\n```python\nb = 2\n```\n"
    assert section_python_blocks(text, "## A") == [(4, "a = 1\n")]
