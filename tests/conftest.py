"""Fixtures shared by the test modules: the tiny model, one torch thread, throwaway plugins."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from runtime.testing import tiny_model
from tests.plugin_dist import install_fake_dist, uninstall_fake_dist


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group tests for pytest-xdist's `loadgroup` and send the slow ones out first.

    A module runs on one worker, in order, so its module fixtures (a live server, a model)
    are built once and its tests see each other's effects as they do in one process; every
    test under tests/distributed shares one worker and so one Ray instance. The tests of a
    module marked `slow` (the compile-heavy ones, each independent) go one by one to
    whichever worker is free, save those that name their own `xdist_group` (a store of
    compiled packages they share), and all go out first: a slow module started last would
    end the run alone on one core.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        module = item.nodeid.split("::", 1)[0]
        if module.startswith("tests/distributed/"):
            item.add_marker(pytest.mark.xdist_group("distributed"))
        elif item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.xdist_group(module))
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
