import sys
import types

import pytest
import torch

from attn_dispatch import hardware
from attn_dispatch.hardware import Hardware, detect


def fake_pynvml(devices, uuids=None):
    """A pynvml stand-in holding (name, (major, minor)) per global index."""
    uuids = uuids or {}
    module = types.ModuleType("pynvml")
    module.nvmlInit = lambda: None
    module.nvmlShutdown = lambda: None
    module.nvmlDeviceGetCount = lambda: len(devices)
    module.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    module.nvmlDeviceGetHandleByUUID = lambda u: devices[uuids[u]]
    module.nvmlDeviceGetCudaComputeCapability = lambda h: h[1]
    module.nvmlDeviceGetName = lambda h: h[0].encode()
    return module


def fake_amdsmi(arch_names):
    module = types.ModuleType("amdsmi")
    module.amdsmi_init = lambda: None
    module.amdsmi_shut_down = lambda: None
    module.amdsmi_get_processor_handles = lambda: list(range(len(arch_names)))
    module.amdsmi_get_gpu_asic_info = lambda h: {"target_graphics_version": arch_names[h], "market_name": "AMD Instinct MI355X"}
    return module


@pytest.fixture
def no_driver_libs(monkeypatch):
    """Neither pynvml nor amdsmi importable, and torch sees no GPU, unless a test says otherwise."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_nvml_sm90(monkeypatch, no_driver_libs):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([("NVIDIA H200", (9, 0))]))
    assert detect(0) == Hardware(vendor="nvidia", arch="sm90", name="NVIDIA H200", index=0)


def test_nvml_sm100_respects_cuda_visible_devices(monkeypatch, no_driver_libs):
    devices = [("NVIDIA H200", (9, 0)), ("NVIDIA B200", (10, 0)), ("NVIDIA H100", (9, 0))]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices, uuids={"GPU-abc": 2}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,GPU-abc")
    assert detect(0).arch == "sm100"  # visible 0 is global 1
    assert detect(1).name == "NVIDIA H100"  # visible 1 is the UUID of global 2
    assert detect(2) == hardware.CPU  # not visible


def test_amdsmi_gfx950(monkeypatch, no_driver_libs):
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(["gfx942", "gfx950:sramecc+:xnack-"]))
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1")
    assert detect(0) == Hardware(vendor="amd", arch="gfx950", name="AMD Instinct MI355X", index=0)


def test_torch_fallback_strips_gcn_feature_suffix(monkeypatch, no_driver_libs):
    props = types.SimpleNamespace(name="AMD Instinct MI355X", gcnArchName="gfx950:sramecc+:xnack-")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.version, "hip", "7.0", raising=False)
    assert detect(0) == Hardware(vendor="amd", arch="gfx950", name="AMD Instinct MI355X", index=0)


def test_torch_fallback_cuda_capability(monkeypatch, no_driver_libs):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(name="NVIDIA B200"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (10, 0))
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert detect(0).arch == "sm100"


def test_broken_driver_library_falls_through_to_cpu(monkeypatch, no_driver_libs):
    broken = fake_pynvml([])
    broken.nvmlInit = lambda: (_ for _ in ()).throw(RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED"))
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert detect(0) == hardware.CPU


def test_no_gpu_is_cpu(no_driver_libs):
    assert detect(0) == hardware.CPU
    assert detect(None) == hardware.CPU


@pytest.mark.parametrize("value, arch, vendor", [("sm90", "sm90", "nvidia"), ("SM100", "sm100", "nvidia"), ("gfx950:xnack-", "gfx950", "amd"), ("cpu", "cpu", "cpu")])
def test_override(monkeypatch, no_driver_libs, value, arch, vendor):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", value)
    found = detect(0)
    assert (found.arch, found.vendor) == (arch, vendor)
    assert found.index == (None if vendor == "cpu" else 0)


def test_unknown_override_lists_known_archs(monkeypatch):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm999")
    with pytest.raises(ValueError, match="ATTN_DISPATCH_ARCH='sm999'.*known: .*sm90.*gfx950.*cpu"):
        detect(0)


def test_hardware_is_immutable():
    with pytest.raises(AttributeError):
        hardware.CPU.arch = "sm90"


@pytest.mark.parametrize("value", ["sm90:foo", "sm90:", "cpu:x", "sm90 "+"x"])
def test_override_suffixes_are_for_gfx_only(monkeypatch, value):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", value)
    with pytest.raises(ValueError, match="ATTN_DISPATCH_ARCH="):
        detect(0)


def test_override_applies_to_gpu_devices_only(monkeypatch, no_driver_libs):
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "sm90")
    assert detect(None) == hardware.CPU
    assert detect(1) == Hardware(vendor="nvidia", arch="sm90", name="simulated by ATTN_DISPATCH_ARCH", index=1)


def test_hardware_reads_plainly():
    assert str(hardware.CPU) == "cpu"
    assert str(Hardware(vendor="nvidia", arch="sm90", name="NVIDIA H200", index=0)) == "sm90 (NVIDIA H200, nvidia device 0)"


def test_detect_reads_the_given_environment_snapshot(monkeypatch):
    """load() reads every setting of one build from one snapshot, the arch override included."""
    monkeypatch.delenv("ATTN_DISPATCH_ARCH", raising=False)
    assert detect(0, {"ATTN_DISPATCH_ARCH": "sm90"}).arch == "sm90"
    monkeypatch.setenv("ATTN_DISPATCH_ARCH", "gfx950")
    assert detect(0, {}).arch != "gfx950"
