"""SDPA over decode widths new at every call, as an engine's growing passes make them: torch's
own backend choice against the engine's (`runtime.sdpa_backends`, cuDNN left out on CUDA).

On a GPU where torch puts cuDNN attention first, each new width builds a cuDNN graph; this
measures what that costs per call. Run: `python benchmarks/sdpa_shapes.py --device cuda`.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from runtime.sdpa_backends import pass_sdpa_backends


def per_call_ms(device: torch.device, dtype: torch.dtype, rows: int, widths: range,
                context: contextlib.AbstractContextManager) -> float:
    """Mean ms of one masked decode-shaped SDPA call `(H_kv, rows, G, D)` per width."""
    kv_heads, group, dim = 3, 3, 64  # the SmolLM2-135M shape
    q = torch.randn(kv_heads, rows, group, dim, device=device, dtype=dtype)
    inputs = []
    for width in widths:
        k = torch.randn(kv_heads, rows, width, dim, device=device, dtype=dtype)
        mask = torch.ones(1, rows, 1, width, device=device, dtype=torch.bool)
        mask[..., : width // 8] = False  # pad columns, as a bucket's
        inputs.append((k, torch.randn_like(k), mask))
    if device.type == "cuda":
        torch.cuda.synchronize()
    with context:
        start = time.perf_counter()
        for k, v, mask in inputs:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / len(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 64])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"cuDNN {torch.backends.cudnn.version()}, SDPA priority "
              f"{torch._C._get_sdp_priority_order()}")
    print("dtype     rows  torch's choice ms/call  engine's ms/call")
    for dtype in (torch.bfloat16, torch.float32):
        for rows in args.rows:
            per_call_ms(device, dtype, rows, range(64, 72), contextlib.nullcontext())  # warm
            # every width new to both, and the two sets alike: even widths and odd ones
            theirs = per_call_ms(device, dtype, rows, range(128, 192, 2), contextlib.nullcontext())
            ours = per_call_ms(device, dtype, rows, range(129, 193, 2), pass_sdpa_backends(device))
            print(f"{str(dtype)[6:]:9} {rows:4}  {theirs:22.3f}  {ours:16.3f}")


if __name__ == "__main__":
    main()
