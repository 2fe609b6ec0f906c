"""Bursts of concurrent completions against a running server, with the server's page faults
and CPU time per burst (read from /proc, so the server must run on this machine).

Each burst sends `--requests` completions at once, each a prompt of `--prompt-words` words
and `--max-tokens` output tokens, and waits for all: a prefill-heavy load that shows what a
large initiation pass costs the server (docs/benchmarks.md, sixteenth session).

    runtime serve MODEL --scheduler orca --max-num-seqs 64 --port 8300 &
    .venv/bin/python benchmarks/served_bursts.py --port 8300 --pid $(pgrep -f "runtime serve")
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time
from pathlib import Path

import requests


def proc_counters(pid: int) -> tuple[int, float, float]:
    """(minor faults, user CPU s, system CPU s) of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), int(fields[11]) / ticks, int(fields[12]) / ticks


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pid", type=int, required=True, help="the server's process id")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", help="model name (default: the server's first)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--bursts", type=int, default=3)
    args = p.parse_args()
    base = f"http://localhost:{args.port}/v1"
    model = args.model or requests.get(f"{base}/models", timeout=30).json()["data"][0]["id"]
    words = " ".join(f"word{i}" for i in range(args.prompt_words))

    def one(i: int) -> int:
        body = {"model": model, "prompt": f"{i} {words}", "max_tokens": args.max_tokens,
                "ignore_eos": True}
        reply = requests.post(f"{base}/completions", json=body, timeout=3600)
        reply.raise_for_status()
        return reply.json()["usage"]["prompt_tokens"]

    for burst in range(args.bursts):
        faults, user, system = proc_counters(args.pid)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
            prompt_tokens = sum(pool.map(one, range(args.requests)))
        seconds = time.perf_counter() - start
        after = proc_counters(args.pid)
        print(f"burst {burst}: {prompt_tokens} prompt tokens, {seconds:.1f} s, minor faults "
              f"{after[0] - faults}, user {after[1] - user:.1f} s, system "
              f"{after[2] - system:.1f} s, resident {resident_mib(args.pid):.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
