"""What a user who installs a release gets: each distribution's wheel, installed into a fresh environment.

The wheels are built by ``tools/wheels.py`` (as CI installs them) and installed into a new venv whose only
other packages are this interpreter's site-packages minus every attn_dispatch distribution, so torch and
pluggy are there but the attn_dispatch packages can only come from the wheels. The tests marked
``packaging`` take about half a minute; deselect them with ``-m "not packaging"``.

Under tox (``TEST_ATTN_DISPATCH_INSTALLED=1``) one more test checks that the whole suite imports the
installed wheels, not the checkout it runs from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_spec = importlib.util.spec_from_file_location("attn_dispatch_tools_wheels", ROOT / "tools" / "wheels.py")
wheels_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wheels_tool)

DISTS = wheels_tool.distributions(ROOT)
PACKAGES = [pkg for dist in DISTS for pkg in wheels_tool.packages(dist)]


def _ours(name: str) -> bool:
    """Whether a site-packages entry belongs to an attn_dispatch distribution (package, dist-info, or an
    editable install's .pth and finder)."""
    return "attn_dispatch" in name.lower().replace("-", "_")


def _source_modules(dist: Path) -> set[str]:
    """Every ``.py`` file of ``dist``'s packages, as a path inside a wheel (``pkg/sub/mod.py``)."""
    found = set()
    for pkg in wheels_tool.packages(dist):
        for path in (dist / pkg).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add(path.relative_to(dist).as_posix())
    return found


def _clean_env() -> dict[str, str]:
    """This process's environment without the variables that could point a child at the checkout or
    change what attn_dispatch does."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ATTN_DISPATCH_")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[Path, Path]:
    """Each distribution folder mapped to its freshly built wheel."""
    return dict(zip(DISTS, wheels_tool.build(tmp_path_factory.mktemp("wheels"), ROOT)))


@pytest.fixture(scope="module")
def wheel_venv(built, tmp_path_factory) -> tuple[Path, Path]:
    """A venv holding the wheels, and this interpreter's other packages through a folder of links.
    Returns ``(venv bin folder, venv site-packages)``."""
    tmp = tmp_path_factory.mktemp("venv")
    env_dir = tmp / "env"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # A plain `venv --system-site-packages` would not do: inside tox (itself a venv) it sees the base
    # interpreter's packages, not the tox env's torch, and here it would also see an editable attn_dispatch.
    deps = tmp / "deps"
    deps.mkdir()
    outer = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    for folder in map(Path, outer):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not (_ours(entry.name) or entry.suffix == ".pth" or (deps / entry.name).exists()):
                (deps / entry.name).symlink_to(entry)
    (purelib / "_outer_site_packages.pth").write_text(f"{deps}\n")
    wheels_tool.install(list(built.values()), python=str(python))
    return python.parent, purelib


# Imports each package given and every module under it; prints {module: file}. A module whose import
# fails for want of an optional third-party package (diffusers for attn_dispatch.integrations) is skipped.
_IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys
files = {}
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    files[name] = package.__file__
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        try:
            files[info.name] = importlib.import_module(info.name).__file__
        except ModuleNotFoundError as error:
            if (error.name or "").startswith("attn_dispatch"):
                raise
print(json.dumps(files))
"""


@pytest.mark.packaging
@pytest.mark.parametrize("dist", DISTS, ids=[wheels_tool.project_name(d) for d in DISTS])
def test_each_wheel_holds_every_module_of_its_distribution(built, dist):
    with zipfile.ZipFile(built[dist]) as wheel:
        in_wheel = {name for name in wheel.namelist() if name.endswith(".py")}
    assert wheels_tool.packages(dist), f"{dist}: no package found"
    assert in_wheel == _source_modules(dist)


@pytest.mark.packaging
def test_installed_wheels_import_from_the_venv_and_run_the_cli(wheel_venv, tmp_path):
    bin_dir, purelib = wheel_venv
    done = subprocess.run([bin_dir / "python", "-c", _IMPORT_EVERY_MODULE, *PACKAGES], capture_output=True,
                          text=True, cwd=tmp_path, env=_clean_env())
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert set(PACKAGES) <= set(imported)
    for module, file in imported.items():
        assert Path(file).resolve().is_relative_to(purelib.resolve()), f"{module} imported from {file}"

    cli = bin_dir / "attn-dispatch"
    assert cli.exists(), "the wheel installs no attn-dispatch command"
    info = subprocess.run([cli, "info"], capture_output=True, text=True, cwd=tmp_path, env=_clean_env())
    assert info.returncode == 0, info.stdout + info.stderr
    as_json = subprocess.run([cli, "info", "--json"], capture_output=True, text=True, cwd=tmp_path,
                             env=_clean_env())
    assert as_json.returncode == 0, as_json.stderr
    json.loads(as_json.stdout)
    for dist in DISTS[1:]:
        for plugin in _entry_point_names(dist):
            assert plugin in info.stdout, f"attn-dispatch info does not list {plugin}:\n{info.stdout}"


def _entry_point_names(dist: Path) -> list[str]:
    """The ``attn_dispatch`` entry-point names a distribution declares (none for a shared library)."""
    names, in_group = [], False
    for line in (dist / "pyproject.toml").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            in_group = line == "[project.entry-points.attn_dispatch]"
        elif in_group and "=" in line and not line.startswith("#"):
            names.append(line.split("=", 1)[0].strip())
    return names


@pytest.mark.skipif(os.environ.get("TEST_ATTN_DISPATCH_INSTALLED") != "1",
                    reason="only where the wheels are installed (tox sets TEST_ATTN_DISPATCH_INSTALLED=1)")
@pytest.mark.parametrize("package", PACKAGES)
def test_the_suite_imports_the_installed_wheels_not_the_checkout(package):
    origin = Path(importlib.util.find_spec(package).origin).resolve()
    sources = [(dist / pkg).resolve() for dist in DISTS for pkg in wheels_tool.packages(dist)]
    assert not any(origin.is_relative_to(src) for src in sources), f"{package} comes from the checkout: {origin}"
    assert "site-packages" in origin.parts, f"{package} is not installed: {origin}"


def test_triton_was_first_imported_in_interpreter_mode_without_a_gpu():
    """The root conftest sets TRITON_INTERPRET before anything imports triton. Triton decorates its own
    library functions (``tl.cdiv``, ...) at import: imported without the variable (as when
    test_fa3_compile's collection imported torch._inductor first), they stay compiled-mode functions and
    every interpreted kernel that calls one fails ("Cannot call @triton.jit'd outside of the scope of a
    kernel"), whatever TRITON_INTERPRET says later."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU runs Triton kernels compiled")
    standard = pytest.importorskip("triton.language.standard")
    from triton.runtime.interpreter import InterpretedFunction

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert isinstance(standard.cdiv, InterpretedFunction), type(standard.cdiv)
