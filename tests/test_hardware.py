"""Startup choices read off the machine: dtype, threads, OpenMP policy (capability mocked)."""

import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from runtime import hardware
from runtime.hardware import (
    CpuInfo,
    choose_auto_dtype,
    choose_num_threads,
    set_openmp_defaults,
    warn_if_slow_dtype,
)
from runtime.loader import resolve_dtype
from runtime.model_config import ModelConfig

AVX2_ONLY = CpuInfo("AMD EPYC", frozenset({"avx2", "fma"}), 2)
AMX = CpuInfo("Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}), 2)
AVX512_BF16 = CpuInfo("AMD Zen 4", frozenset({"avx512f", "avx512_bf16"}), 8)


@pytest.mark.parametrize("checkpoint", ["bfloat16", "float16"])
def test_half_checkpoint_upcasts_without_native_bf16(checkpoint: str) -> None:
    choice = choose_auto_dtype(checkpoint, "cpu", AVX2_ONLY)
    assert choice.dtype == "float32"
    assert "no native bfloat16" in choice.reason


@pytest.mark.parametrize("cpu", [AMX, AVX512_BF16])
@pytest.mark.parametrize("checkpoint", ["bfloat16", "float16"])
def test_half_checkpoint_runs_bf16_with_native_support(cpu: CpuInfo, checkpoint: str) -> None:
    choice = choose_auto_dtype(checkpoint, "cpu", cpu)
    assert choice.dtype == "bfloat16"
    assert "avx512_bf16" in choice.reason


@pytest.mark.parametrize("checkpoint", ["float32", "float64"])
@pytest.mark.parametrize("cpu", [AVX2_ONLY, AMX])
def test_full_precision_checkpoint_keeps_its_dtype(checkpoint: str, cpu: CpuInfo) -> None:
    assert choose_auto_dtype(checkpoint, "cpu", cpu).dtype == checkpoint
    assert choose_auto_dtype(checkpoint, "cuda", cpu).dtype == checkpoint


def test_half_checkpoint_keeps_its_dtype_on_cuda() -> None:
    assert choose_auto_dtype("float16", "cuda", AVX2_ONLY).dtype == "float16"
    assert choose_auto_dtype("bfloat16", "cuda", AVX2_ONLY).dtype == "bfloat16"


def test_explicit_bf16_without_native_support_warns() -> None:
    assert "slower" in warn_if_slow_dtype("bfloat16", "cpu", AVX2_ONLY)
    assert warn_if_slow_dtype("bfloat16", "cpu", AMX) is None
    assert warn_if_slow_dtype("bfloat16", "cuda", AVX2_ONLY) is None
    assert warn_if_slow_dtype("float32", "cpu", AVX2_ONLY) is None


@pytest.mark.parametrize(("cpu", "expected"), [(AVX2_ONLY, torch.float32), (AMX, torch.bfloat16)])
def test_loader_auto_dtype_follows_the_cpu(monkeypatch, caplog, cpu, expected) -> None:
    monkeypatch.setattr("runtime.loader.cpu_info", lambda: cpu)
    config = ModelConfig("LlamaForCausalLM", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=8, torch_dtype="bfloat16")
    with caplog.at_level(logging.INFO, logger="runtime.loader"):
        assert resolve_dtype("auto", config, "cpu") == expected
    assert "dtype auto" in caplog.text


def test_loader_warns_for_explicit_bf16_on_avx2(monkeypatch, caplog) -> None:
    monkeypatch.setattr("runtime.loader.cpu_info", lambda: AVX2_ONLY)
    config = ModelConfig("LlamaForCausalLM", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=8)
    with caplog.at_level(logging.WARNING, logger="runtime.loader"):
        assert resolve_dtype("bfloat16", config, "cpu") == torch.bfloat16
    assert "without native bfloat16" in caplog.text


CPUINFO_HT = """processor\t: 0
model name\t: Test CPU
physical id\t: 0
core id\t: 0
flags\t\t: fpu avx2 avx512_bf16

processor\t: 1
model name\t: Test CPU
physical id\t: 0
core id\t: 0
flags\t\t: fpu avx2 avx512_bf16

processor\t: 2
model name\t: Test CPU
physical id\t: 0
core id\t: 1
flags\t\t: fpu avx2 avx512_bf16
"""


def test_cpuinfo_counts_physical_cores_of_allowed_cpus() -> None:
    info = hardware._parse_cpuinfo(CPUINFO_HT, {0, 1, 2})
    assert info.physical_cores == 2  # two hyperthreads of core 0, one of core 1
    assert info.native_bf16 and info.model_name == "Test CPU"
    assert hardware._parse_cpuinfo(CPUINFO_HT, {0, 1}).physical_cores == 1


def test_threads_default_to_physical_cores() -> None:
    assert choose_num_threads(None, CpuInfo("x", frozenset(), 6)).num_threads == 6
    assert choose_num_threads(3, CpuInfo("x", frozenset(), 6)).num_threads == 3


def test_openmp_policy_spins_on_an_idle_machine_and_sleeps_under_load() -> None:
    env: dict[str, str] = {}
    assert "GOMP_SPINCOUNT" in set_openmp_defaults(env, busy=0.1)
    assert env["GOMP_SPINCOUNT"] == hardware.SPIN_COUNT and "OMP_WAIT_POLICY" not in env
    env = {}
    assert "PASSIVE" in set_openmp_defaults(env, busy=1.0) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "GOMP_SPINCOUNT" not in env
    env = {}
    assert "load unknown" in set_openmp_defaults(env, measure=False)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    # a child `runtime` (a server the bench launched) decides for its own start
    assert "GOMP_SPINCOUNT" in set_openmp_defaults(env, busy=0.0)
    assert "OMP_WAIT_POLICY" not in env and env["GOMP_SPINCOUNT"] == hardware.SPIN_COUNT
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert "set by the user" in set_openmp_defaults(env, busy=0.0)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"GOMP_SPINCOUNT": "1000"}
    set_openmp_defaults(env, busy=3.0)
    assert env == {"GOMP_SPINCOUNT": "1000"}


def test_busy_cpus_reads_the_load_of_proc_stat(tmp_path, monkeypatch) -> None:
    stat = tmp_path / "stat"
    samples = iter(["cpu  100 0 100 800 0 0 0 0 0 0\n", "cpu  250 0 150 900 0 0 0 50 0 0\n"])

    def tick(_seconds: float) -> None:
        stat.write_text(next(samples, "cpu  250 0 150 900 0 0 0 50 0 0\n"))

    tick(0)
    monkeypatch.setattr(hardware.time, "sleep", tick)
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    # 200 busy of 300 jiffies on 2 CPUs (steal not counted): 1.33 CPUs busy
    assert hardware.busy_cpus(stat_path=str(stat)) == pytest.approx(2 * 200 / 300)
    assert hardware.busy_cpus(stat_path=str(tmp_path / "missing")) is None


def test_cli_sets_openmp_policy_before_torch_loads() -> None:

    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); "
            "os.environ.pop('GOMP_SPINCOUNT', None); import runtime.cli as c; "
            "assert 'torch' not in sys.modules; c.main(['schedulers']); "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("PASSIVE None")  # no model to run: no load sampled


def test_keep_freed_memory_applies_on_glibc() -> None:
    assert isinstance(hardware.keep_freed_memory(), bool)


REUSE_PROBE = """
import resource, sys, threading, torch
from runtime import hardware
applied = hardware.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []

def passes():  # on another thread, as the engine loop steps
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [torch.empty(mib * 2**20 // 4).fill_(1.0) for mib in (50, 96, 20, 96, 8)]
        del buffers
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=passes)
thread.start()
thread.join()
print(applied, sum(faults[8:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_reuses_buffers_above_the_mmap_cap() -> None:
    """Pass-like rounds of buffers up to 96 MiB, freed and asked for again on a non-main
    thread: once the heap has grown (a few rounds), a round takes no page faults (glibc alone maps the
    buffers above 32 MiB afresh, and trims what it freed at the heap's top, every round)."""

    def probe(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], capture_output=True,
                             text=True, check=True)
        applied, faults = out.stdout.split()
        return applied, int(faults)

    applied, kept_faults = probe("keep")
    if applied != "True":
        pytest.skip("not glibc: mallopt unavailable")
    _, default_faults = probe("default")
    assert default_faults > 4 * 50_000  # the probe sees the faults it is meant to remove
    assert kept_faults < default_faults // 50


def _thread_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def test_call_on_fresh_thread_returns_raises_and_leaves_no_openmp_team() -> None:
    """The builder thread's OpenMP workers must exit with it, or the engine thread's team is
    throttled (libgomp sleeps between regions once threads outnumber CPUs)."""
    assert hardware.call_on_fresh_thread(lambda: threading.current_thread().name) == "build-engine"
    with pytest.raises(KeyError, match="boom"):
        hardware.call_on_fresh_thread(lambda: {}["boom"])
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs /proc to list threads")

    def parallel_work() -> set[str]:
        torch.set_num_threads(2)  # a team of two: this thread and one OpenMP worker
        a = torch.randn(256, 256)
        for _ in range(3):
            a = torch.tanh(a @ a)
        return _thread_ids()

    hardware.call_on_fresh_thread(parallel_work)  # torch's first use starts a process-wide thread
    before = _thread_ids()
    started = hardware.call_on_fresh_thread(parallel_work) - before
    assert len(started) >= 2  # the builder and its OpenMP worker existed
    deadline = time.monotonic() + 5.0
    while started & _thread_ids() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not started & _thread_ids()
