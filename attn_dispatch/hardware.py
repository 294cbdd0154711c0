"""Which accelerator is this? One small immutable record, found without creating a CUDA context.

Order of evidence:
1. ``ATTN_DISPATCH_ARCH`` (tests and simulation) wins over everything, for GPU devices; the CPU stays the CPU.
2. NVML (``pynvml``) or ``amdsmi`` when importable: they read the driver, so no CUDA/HIP context is made
   at engine start-up. NVML indices are global, so ``CUDA_VISIBLE_DEVICES`` is mapped first.
3. torch: ``get_device_capability`` on CUDA, ``gcnArchName`` (feature suffixes stripped) on ROCm.
4. Otherwise the CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("attn_dispatch")

ARCH_ENV = "ATTN_DISPATCH_ARCH"

NVIDIA_ARCHS = ("sm70", "sm75", "sm80", "sm86", "sm87", "sm89", "sm90", "sm100", "sm103", "sm110", "sm120", "sm121")
AMD_ARCHS = ("gfx908", "gfx90a", "gfx940", "gfx941", "gfx942", "gfx950", "gfx1100", "gfx1101", "gfx1200", "gfx1201")
KNOWN_ARCHS = NVIDIA_ARCHS + AMD_ARCHS + ("cpu",)

Vendor = Literal["nvidia", "amd", "cpu"]


@dataclass(frozen=True)
class Hardware:
    """The device plugins are matched against. ``arch`` is what plugins list in their targets."""

    vendor: Vendor
    arch: str
    name: str
    index: int | None  # None for the CPU

    def __str__(self) -> str:
        if self == CPU:
            return "cpu"
        where = "" if self.index is None else f", {self.vendor} device {self.index}"
        return f"{self.arch} ({self.name}{where})"


CPU = Hardware(vendor="cpu", arch="cpu", name="cpu", index=None)


def vendor_of(arch: str) -> Vendor:
    if arch.startswith("sm"):
        return "nvidia"
    if arch.startswith("gfx"):
        return "amd"
    return "cpu"


def normalize_gcn_arch(gcn_arch_name: str) -> str:
    """``'gfx950:sramecc+:xnack-'`` -> ``'gfx950'``."""
    return gcn_arch_name.split(":", 1)[0].strip()


def detect(index: int | None = 0, environ: Mapping[str, str] | None = None) -> Hardware:
    """Describe device ``index`` (an index among the *visible* devices); ``None`` asks for the CPU.

    ``ATTN_DISPATCH_ARCH`` simulates an arch for GPU indices only: ``detect(None)`` is always the CPU
    (the override is still checked, so a typo is a ``ValueError`` whatever the device). ``environ``: where
    to read it (``load()`` passes the one snapshot every setting of that load is read from).
    """
    override = (os.environ if environ is None else environ).get(ARCH_ENV, "").strip()
    simulated = _from_override(override, index) if override else None
    if index is None:
        return CPU
    if simulated is not None:
        return simulated
    for probe in (_probe_nvml, _probe_amdsmi, _probe_torch):
        try:
            found = probe(index)
        except Exception as exc:  # a broken driver library must not stop the engine: try the next probe
            log.debug("hardware probe %s failed: %s", probe.__name__, exc)
            continue
        if found is not None:
            return found
    return CPU


def _from_override(value: str, index: int | None) -> Hardware:
    arch = value.lower()
    if arch.startswith("gfx"):  # only gfx names carry feature suffixes (gfx950:sramecc+:xnack-)
        arch = normalize_gcn_arch(arch)
    if arch not in KNOWN_ARCHS:
        raise ValueError(f"{ARCH_ENV}={value!r} is not a known arch; known: {', '.join(KNOWN_ARCHS)} (gfx archs may add :feature suffixes)")
    vendor = vendor_of(arch)
    return Hardware(
        vendor=vendor,
        arch=arch,
        name=f"simulated by {ARCH_ENV}",
        index=None if vendor == "cpu" else (index or 0),
    )


def _visible_ordinals(env_names: tuple[str, ...]) -> list[str] | None:
    """The visible-device list from the first set variable, or None if none is set."""
    for name in env_names:
        value = os.environ.get(name)
        if value is not None:
            return [item.strip() for item in value.split(",") if item.strip()]
    return None


def _probe_nvml(index: int) -> Hardware | None:
    import pynvml

    pynvml.nvmlInit()
    try:
        visible = _visible_ordinals(("CUDA_VISIBLE_DEVICES",))
        if visible is None:
            if index >= pynvml.nvmlDeviceGetCount():
                return None
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        else:
            if index >= len(visible):
                return None
            entry = visible[index]
            if entry.isdigit():
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(entry))
            else:  # "GPU-<uuid>" or "MIG-<uuid>"
                handle = pynvml.nvmlDeviceGetHandleByUUID(entry)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):
            name = name.decode()
    finally:
        pynvml.nvmlShutdown()
    return Hardware(vendor="nvidia", arch=f"sm{major}{minor}", name=str(name), index=index)


def _probe_amdsmi(index: int) -> Hardware | None:
    import amdsmi

    amdsmi.amdsmi_init()
    try:
        handles = amdsmi.amdsmi_get_processor_handles()
        visible = _visible_ordinals(("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"))
        if visible is not None:
            if index >= len(visible) or not visible[index].isdigit():
                return None
            index_global = int(visible[index])
        else:
            index_global = index
        if index_global >= len(handles):
            return None
        info = amdsmi.amdsmi_get_gpu_asic_info(handles[index_global])
    finally:
        amdsmi.amdsmi_shut_down()
    arch = normalize_gcn_arch(str(info.get("target_graphics_version", "")))
    if not arch.startswith("gfx"):
        return None
    return Hardware(vendor="amd", arch=arch, name=str(info.get("market_name", arch)), index=index)


def _probe_torch(index: int) -> Hardware | None:
    import torch

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    props = torch.cuda.get_device_properties(index)
    if getattr(torch.version, "hip", None):
        return Hardware(vendor="amd", arch=normalize_gcn_arch(props.gcnArchName), name=props.name, index=index)
    major, minor = torch.cuda.get_device_capability(index)
    return Hardware(vendor="nvidia", arch=f"sm{major}{minor}", name=props.name, index=index)
