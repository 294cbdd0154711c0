"""tox plugin of this project (tox loads ``toxfile.py`` from beside ``tox.ini``): the environment setting
``host_site_packages``.

``system_site_packages = true`` shows an environment the packages of the *base* interpreter. On GPU images
``python3`` is often a venv itself (the CUDA image's torch, triton and pytest live in ``/opt/torch/.venv``),
and virtualenv builds on the base interpreter, so those would be missing. With ``host_site_packages = true``
the environment also sees the site-packages of the interpreter that runs tox, after its own (what the
environment installs, our wheels, wins), through a ``.pth`` file written before its commands run.
"""

from __future__ import annotations

import site
from pathlib import Path

from tox.plugin import impl


@impl
def tox_add_env_config(env_conf, state) -> None:
    env_conf.add_config(
        keys=["host_site_packages"],
        of_type=bool,
        default=False,
        desc="also see the site-packages of the interpreter running tox, after the environment's own",
    )


@impl
def tox_before_run_commands(tox_env) -> None:
    if not tox_env.conf["host_site_packages"]:
        return
    folders = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    pth = Path(tox_env.conf["env_site_packages_dir"]) / "_tox_host_site_packages.pth"
    pth.write_text("".join(f"{folder}\n" for folder in folders if Path(folder).is_dir()))
