"""Host-side counters that ``attn-dispatch info`` (through the register note) and the benchmark report.

They are plain Python ints bumped where the host issues the work, so reading them never touches the
device. Work replayed from a CUDA graph is counted once, when it was captured.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Stats:
    """``out_copies``: copies into the engine's ``out`` made on the optimized path because the provider
    cannot write into a given buffer (upstream ``flash_attn_interface``); 0 with sgl_kernel, vllm or FA4.
    The original path's copy is by design and is not counted.
    ``metadata_builds``: scheduler-metadata tensors computed (one ``prepare_varlen_num_blocks`` each).
    ``static_refreshes``: plans refreshed into a static plan's persistent buffers (CUDA-graph steps).
    ``guarded_bindings``: layer calls bound to the dense torch route because :mod:`.known_wrong` lists the
    configuration for the installed provider (logged once per class). Under torch.compile the custom op
    binds in its body, so there every call of such a layer counts.
    """

    out_copies: int = 0
    metadata_builds: int = 0
    static_refreshes: int = 0
    guarded_bindings: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


stats = Stats()
