"""Fixtures shared by the test modules: the tiny model, one torch thread, throwaway plugins."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from runtime.testing import tiny_model
from tests.plugin_dist import install_fake_dist, uninstall_fake_dist


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules marked `slow` (the compile-heavy ones) first, for pytest-xdist's `loadfile`.

    Each module runs on one worker, in order (its module fixtures, such as a store of compiled
    packages or a live server, are built once), and a worker takes the next module when it is
    nearly done; a slow module taken last would end the run alone on one core.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


@pytest.fixture(scope="module")
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    """The conformance kit's tiny float64 model, seeded by the module's `MODEL_SEED` (default 0).

    Its weights are large (std 0.3), so attention is sharp: a wrong position or a leaked pad
    key changes the argmax.
    """
    return tiny_model(seed=getattr(request.module, "MODEL_SEED", 0))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server tests' tiny Llama folder with its tokenizer (tests/server/conftest.py)."""
    from tests.server.conftest import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny shapes: OpenMP threads only contend (SDPA 12 ms instead of 10 us on a busy box).

    Opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def install_plugin(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Install throwaway scheduler distributions, as a third party ships one; removed after.

    `install_plugin(dist, {entry point: "module:Class"}, module, source)` returns its folder.
    """
    installed: list[tuple[Path, str]] = []

    def install(dist: str, entry_points: dict[str, str], module: str, source: str) -> Path:
        site = tmp_path / f"site-{dist}"
        install_fake_dist(site, dist, entry_points, module, source)
        installed.append((site, module))
        return site

    yield install
    for site, module in installed:
        uninstall_fake_dist(site, module)


@pytest.fixture(scope="session")
def native_kernel() -> None:
    """Skip where the decode-attention kernel cannot be built (no C++ compiler)."""
    from runtime.attention_kernels import NativeKernelUnavailable, load_native_kernel

    try:
        load_native_kernel()
    except NativeKernelUnavailable as exc:
        pytest.skip(f"native decode-attention kernel unavailable: {exc}")


BACKENDS = ("native", "sdpa")  # attention_backend values a layout test runs under


@pytest.fixture
def cpp_gemms_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen GEMMs on inductor's C++ template only, which computes from its own packed copy.

    Autotuning may pick ATen's GEMM instead, which reads the dense weight. At these tiny
    shapes the two time alike, so the pick follows the machine's load (under a parallel run
    it went to ATen three times in three): tests that need a packed copy, or the dense weights
    unread, fix it. Its settings are part of a package store's key, so the tests that share a
    store all use it.
    """
    from runtime.static_graphs import FROZEN_GEMM_SETTINGS, PACKAGE_SETTINGS

    for settings in (FROZEN_GEMM_SETTINGS, PACKAGE_SETTINGS):
        monkeypatch.setitem(settings, "max_autotune_gemm_backends", "CPP")


@pytest.fixture(autouse=True)
def no_bucket_speed_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built `static_decode_rows` buckets serve without the startup check that drops one
    slower than the dynamic graph: on the tests' tiny models the two time alike, so the check
    would keep or drop a bucket as the machine's load falls, and the tests that count bucket
    passes need them kept. The check's own tests turn it back on with a path made slow."""
    from runtime import static_graphs

    monkeypatch.setattr(static_graphs, "SPEED_CHECK_ROUNDS", 0)
