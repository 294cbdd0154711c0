"""``benchmarks/bench_diffusers.py --smoke`` runs to the end on the CPU (tiny configs, the stand-in
provider, ``aot_eager``): the benchmark that produces the README's diffusers numbers cannot rot between
device sessions. Timings mean nothing here; only that every row, the A/B included, is produced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_diffusers.py"


def test_smoke_run_produces_every_row(tmp_path):
    out = tmp_path / "diffusers.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--key-pages", "--no-prx", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert "compile_error" not in row, row["compile_error"]
        for table in ("eager_ms", "compiled_ms"):
            assert set(row[table]) >= {"native masked", "native no mask", "attn_dispatch", "attn_dispatch, K/V as pages"}
        assert row["builds_per_forward"] == [1, 0]
        assert row["correctness"]["max_abs_err"] <= 0.05 * row["correctness"]["out_max_abs"]
        assert row["pages_correctness"]["max_abs_err"] <= 0.05 * row["correctness"]["out_max_abs"]
