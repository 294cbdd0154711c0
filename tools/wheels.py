"""Build every distribution of this repository into a wheel, and install those wheels.

CI (``tox -e cpu``), the GPU run (``tox -e cuda``) and ``tests/test_packaging.py`` test what a user
installs: wheels, not the source tree. Everything here works offline: no build isolation (setuptools must
already be importable), no package index, and no dependency resolution (the environment supplies torch,
pluggy, numpy and triton)::

    python tools/wheels.py build OUT_DIR     # one wheel per distribution into OUT_DIR
    python tools/wheels.py install           # build into a temporary folder, install into this Python

Distributions are found, not listed: the repository root (``attn-dispatch``) and every ``plugins/<name>/``
holding a ``pyproject.toml`` (the plugins and the internal libraries they share, such as ``plugins/flash``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Top-level names of a distribution folder that never belong in its build: build outputs, caches, VCS and
# tool state, and (for the root) the other distributions, tests and benchmarks.
_SKIP_TOP = {"build", "dist", "tests", "benchmarks", "plugins", "__pycache__"}


def distributions(root: Path = ROOT) -> list[Path]:
    """The folders of every distribution in the repository: the root first, then ``plugins/*`` sorted."""
    return [root] + sorted(p.parent for p in root.glob("plugins/*/pyproject.toml"))


def packages(dist: Path) -> list[str]:
    """The top-level import packages of a distribution: its sub-folders holding an ``__init__.py``."""
    return sorted(p.parent.name for p in dist.glob("*/__init__.py") if p.parent.name not in _SKIP_TOP)


def _stage(dist: Path, into: Path) -> Path:
    """Copy what a build of ``dist`` reads into a fresh folder, so that stale ``build/`` output or
    ``*.egg-info`` in a development checkout cannot end up in the wheel, and the checkout is not written."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n.startswith(".") or n.endswith(".egg-info") or n == "__pycache__"}
        if Path(folder) == dist:
            skip |= _SKIP_TOP & set(names)
        return skip

    target = into / (dist.name if dist != ROOT else "attn_dispatch_root")
    shutil.copytree(dist, target, ignore=ignore)
    return target


def build(out_dir: Path, root: Path = ROOT) -> list[Path]:
    """Build one wheel per distribution into ``out_dir`` and return their paths, in :func:`distributions`
    order. Raises ``RuntimeError`` if pip fails or a distribution yields no wheel."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dists = distributions(root)
    with tempfile.TemporaryDirectory(prefix="attn-dispatch-stage-") as tmp:
        staged = [_stage(d, Path(tmp)) for d in dists]
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
               "--wheel-dir", str(out_dir), *map(str, staged)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip wheel failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    wheels = []
    for dist in dists:
        name = project_name(dist).replace("-", "_")
        found = sorted(out_dir.glob(f"{name}-*.whl"))
        if len(found) != 1:
            raise RuntimeError(f"{dist}: expected one wheel named {name}-*.whl in {out_dir}, found {found}")
        wheels.append(found[0])
    return wheels


def install(wheels: list[Path], python: str = sys.executable) -> None:
    """Install ``wheels`` into ``python``'s environment without touching their dependencies. Reinstalls
    even an unchanged version, so a reused environment (tox's) never keeps stale code."""
    cmd = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
           *map(str, wheels)]
    subprocess.run(cmd, check=True)


def project_name(dist: Path) -> str:
    """``[project] name`` of ``dist``'s pyproject.toml, read without a TOML parser (3.10 has none)."""
    in_project = False
    for line in (dist / "pyproject.toml").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            in_project = line == "[project]"
        elif in_project and line.startswith("name") and "=" in line:
            return line.split("=", 1)[1].strip().strip("\"'")
    raise RuntimeError(f"{dist / 'pyproject.toml'}: no [project] name")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the wheels into OUT_DIR").add_argument("out_dir", type=Path)
    sub.add_parser("install", help="build the wheels and install them into this Python")
    args = parser.parse_args(argv)
    if args.command == "build":
        for wheel in build(args.out_dir):
            print(wheel)
        return 0
    with tempfile.TemporaryDirectory(prefix="attn-dispatch-wheels-") as tmp:
        wheels = build(Path(tmp))
        install(wheels)
    print("installed: " + ", ".join(w.name for w in wheels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
