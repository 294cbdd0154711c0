"""attn_dispatch: hardware-specific attention fast paths as plugins, with the original path as fallback.

    import attn_dispatch
    ops = attn_dispatch.load()      # at engine start-up
    ops.paged_attention_out(...)    # per layer: a plain function call

See ``attn_dispatch.reference`` for what each operation means and ``attn-dispatch info`` for what ran.
"""

from .hardware import CPU, KNOWN_ARCHS, Hardware, detect
from .hookspecs import MissingDependency, NotThisArch, PluginSpec, PluginUnavailable, hookimpl
from .ops import OP_GROUPS, OP_NAMES, Ops, Resolution
from .plans import DEFAULT_PARAMS, AttentionParams, AttentionPlan, MaskMeta
from .plugins import PluginLoadError, PluginReport, list_plugins, load, reset
from .settings import Setting, SettingValue

__version__ = "0.1.0"

__all__ = [
    "CPU",
    "DEFAULT_PARAMS",
    "KNOWN_ARCHS",
    "OP_GROUPS",
    "OP_NAMES",
    "AttentionParams",
    "AttentionPlan",
    "Hardware",
    "MaskMeta",
    "MissingDependency",
    "NotThisArch",
    "Ops",
    "PluginLoadError",
    "PluginReport",
    "PluginSpec",
    "PluginUnavailable",
    "Resolution",
    "Setting",
    "SettingValue",
    "detect",
    "hookimpl",
    "list_plugins",
    "load",
    "reset",
]
