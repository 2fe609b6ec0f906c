"""Which of torch's SDPA backends an engine pass lets torch pick, per device.

On CUDA, recent torch (2.10 and later, with cuDNN newer than 9.15) puts cuDNN attention first on
Hopper and Blackwell GPUs. cuDNN builds an execution graph for each new shape of q, k, v and
mask, and caches it by shape. A serving engine's decode widths and prompt lengths change from
one pass to the next, so almost every SDPA call would build a graph (tens of milliseconds each,
per layer). Flash and memory-efficient attention have no per-shape setup, so a pass runs with
those and the math fallback only. Measured on an H100 (torch 2.11, CUDA 13): a 1-64 row
bfloat16 decode step of the SmolLM2-135M shape took 45-50 ms against 10.7-13.0 ms in float32,
a dtype cuDNN attention does not take, with both steps' GEMMs at 1.6-2.4 ms.

Elsewhere (CPU) torch's own choice stands: the context is a no-op.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDA_PASS_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH)


def pass_sdpa_backends(device: torch.device) -> AbstractContextManager:
    """The context an engine pass on `device` runs in: on CUDA, SDPA without cuDNN."""
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel(list(CUDA_PASS_BACKENDS))
