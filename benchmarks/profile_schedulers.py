"""Where the time goes: replay one workload under several schedulers with torch's profiler.

Groups the CPU self time of every op into GEMMs, attention, KV-cache data movement and the
rest, and adds the Python time outside torch ops (the step loop, hooks, bookkeeping), so a
throughput ratio between schedulers can be explained by its parts.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_schedulers.py \
        --model-spec smollm2-135m-shape --workload orca-trace --num-requests 16 \
        --schedulers baton,orca

`--device cuda` profiles the GPU too. A small model's GPU pass is bound by the host: each
kernel is a launch, and a host-device synchronisation (`cudaStreamSynchronize`, a blocking
copy) stops the host from queueing the next kernels while the GPU works. So the table adds the
GPU's busy time, the kernels launched and the synchronising calls per scheduler: where one
scheduler is slower than another on a GPU, these say whether it launches more, waits more
or computes more.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from runtime.bench.main import _scheduler_options
from runtime.bench.model_spec import resolve_model
from runtime.bench.offline import EngineContender
from runtime.bench.workload import generate_requests, load_workload
from runtime.engine import EngineLimits
from runtime.loader import load_model, load_model_config

GROUPS = {
    "gemm (linear/matmul)": (
        "aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "mkldnn::_linear_pointwise"
    ),
    "attention (sdpa/bmm/softmax)": ("scaled_dot_product", "aten::bmm", "softmax", "aten::baddbmm"),
    "kv data movement (copy/cat/index)": (
        "aten::copy_",
        "aten::cat",
        "aten::index",
        "aten::index_select",
        "aten::index_put",
        "aten::index_copy",
        "aten::narrow_copy",
        "aten::zero_",
        "aten::fill_",
        "aten::clone",
        "aten::contiguous",
        "aten::empty",
        "aten::masked_fill",
        "aten::where",
    ),
    "views (per-op dispatch overhead)": (
        "aten::as_strided",
        "aten::slice",
        "aten::transpose",
        "aten::select",
        "aten::view",
        "aten::reshape",
        "aten::unsqueeze",
        "aten::expand",
        "aten::t",
        "aten::split",
        "aten::chunk",
        "aten::unbind",
        "aten::permute",
        "aten::squeeze",
        "aten::_unsafe_view",
    ),
    "norm/rope/activation/elementwise": (
        "aten::mul",
        "aten::add",
        "aten::silu",
        "aten::rms_norm",
        "aten::neg",
        "aten::rsqrt",
        "aten::pow",
        "aten::mean",
        "aten::sub",
        "aten::div",
        "aten::embedding",
    ),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(name in (k, k + "_") or (not k.startswith("aten::") and k in name) for k in keys):
            return group
    return "other torch ops"


# CUDA runtime calls that block the host until the GPU has caught up (torch follows a blocking
# host-to-device copy with `cudaStreamSynchronize`)
SYNCHRONISING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
                       "cudaEventSynchronize")


def profile_one(contender: EngineContender, requests, cuda: bool = False) -> dict[str, float]:
    """Seconds per group for one run, plus wall time and the Python time outside torch ops;
    with `cuda`, also the GPU's kernel time, the kernels launched and the synchronising calls."""
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        trace = contender.run(requests)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    out: dict[str, float] = defaultdict(float)
    gpu: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        gpu["GPU busy (kernel time)"] += evt.self_device_time_total / 1e6
        if evt.key.startswith("cu"):  # CUDA runtime and driver API calls
            if evt.key in SYNCHRONISING_CALLS:
                gpu["host-device syncs (count)"] += evt.count
                gpu["host waiting on syncs"] += evt.self_cpu_time_total / 1e6
            if "LaunchKernel" in evt.key:
                gpu["kernels launched (count)"] += evt.count
            continue
        out[group_of(evt.key)] += evt.self_cpu_time_total / 1e6
    torch_total = sum(out.values())
    out["python outside torch ops (+ sleep)"] = max(0.0, wall - torch_total)
    if cuda:
        out.update(gpu)
    out["wall"] = wall
    out["forward passes"] = len(trace.passes)
    out["token slots computed"] = sum(p.computed_tokens for p in trace.passes)
    out["attention pairs computed (M)"] = sum(p.computed_pairs for p in trace.passes) / 1e6
    return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-spec", default="smollm2-135m-shape")
    p.add_argument("--workload", default="orca-trace")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--all-at-once", action="store_true")
    p.add_argument("--schedulers", default="baton,orca")
    p.add_argument("--scheduler-option", action="append", default=[], metavar="LABEL.KEY=VAL")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    options = _scheduler_options(args.scheduler_option)
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model_spec)
    config = load_model_config(path)
    spec = load_workload(args.workload).with_overrides(
        args.num_requests, all_at_once=args.all_at_once
    )
    max_len = min(config.max_position_embeddings, spec.max_total_len())
    requests = generate_requests(spec, config.vocab_size, max_len)
    model = load_model(path, dtype=args.dtype, device=args.device)
    cuda = torch.device(args.device).type == "cuda"
    results = {}
    for entry in args.schedulers.split(","):
        label, _, name = entry.rpartition("=")  # LABEL=SCHEDULER, as in `runtime bench`
        label = label or name
        contender = EngineContender(label, name, model, None, EngineLimits(64, max_len),
                                    options.get(label))
        contender.warmup()
        results[label] = profile_one(contender, requests, cuda)
    keys = [
        *GROUPS,
        "other torch ops",
        "python outside torch ops (+ sleep)",
        "wall",
        "forward passes",
        "token slots computed",
        "attention pairs computed (M)",
    ]
    if cuda:
        keys += ["GPU busy (kernel time)", "kernels launched (count)",
                 "host-device syncs (count)", "host waiting on syncs"]
    print(f"{'seconds':<38}" + "".join(f"{n:>12}" for n in results))
    for key in keys:
        print(f"{key:<38}" + "".join(f"{results[n].get(key, 0.0):>12.2f}" for n in results))


if __name__ == "__main__":
    main()
