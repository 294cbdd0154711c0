"""What every engine integration needs from the host: a library version check, and the op group per
device (``attn_dispatch.load(device)``, cached until the host loads again; or one a test injected)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .. import plugins

log = logging.getLogger("attn_dispatch")


def check_series(package: str, version: str, supported: tuple[str, ...], error: type[Exception], off: str) -> None:
    """Raise ``error`` unless ``version``'s major.minor series is in ``supported``; ``off``: what the
    message ends with (what happens to the integration when it is refused)."""
    if ".".join(version.split(".")[:2]) not in supported:
        raise error(
            f"attn_dispatch's {package} integration supports {package} {', '.join(s + '.x' for s in supported)}; "
            f"{package} {version} is installed. Install a supported version (pip install '{package}=={supported[-1]}.*') "
            f"or {off}"
        )


class OpGroups:
    """The op group an integration calls on each device, or None where it must not be used (then the
    integration calls its library's own attention).

    ``op``: the op the integration needs; a device where it resolved to the reference gets None. ``refuse``:
    an extra reason, from the loaded ``Ops``, not to use them (a warning is logged once per device).
    Cached per device and keyed on :func:`attn_dispatch.plugins.generation`, so ``attn_dispatch.reset()``
    or ``load(refresh=True)`` reaches the integration. :meth:`use` injects one group for every device.
    """

    def __init__(self, op: str, refuse: Callable[[Any], str | None] | None = None) -> None:
        self.op, self.refuse = op, refuse
        self.injected: Any = None
        self.by_device: dict[torch.device, tuple[int, Any]] = {}  # device -> (load generation, group or None)

    def use(self, group: Any | None) -> None:
        self.injected = group
        self.by_device.clear()

    def get(self, device: torch.device) -> Any | None:
        if self.injected is not None:
            return self.injected
        cached = self.by_device.get(device)
        if cached is not None and cached[0] == plugins.generation():
            return cached[1]
        ops = plugins.load(device)
        resolution = ops.resolutions.get(self.op)
        usable = resolution is not None and resolution.plugin != "reference"
        if usable and self.refuse is not None and (reason := self.refuse(ops)):
            log.warning("attn_dispatch on %s: %s", device, reason)
            usable = False
        self.by_device[device] = (plugins.generation(), ops if usable else None)
        return self.by_device[device][1]
