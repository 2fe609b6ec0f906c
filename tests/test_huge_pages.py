"""Huge-page buffers (`runtime.huge_pages`): the same tensors `torch.empty` gives, in mappings
that ask for 2 MiB pages, for BATON's KV buffer and the packed weights."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
import torch

from runtime import huge_pages
from runtime.api import kv_empty
from runtime.linear_kernels import model_linears, pack_linears, packing_supported
from runtime.plugins import instantiate_scheduler
from runtime.testing import make_engine, tiny_model

BIG = (3, 1024, 700)  # 8.2 MiB of float32, not a multiple of 2 MiB
needs_huge_pages = pytest.mark.skipif(huge_pages.huge_pages_mode() is None,
                                      reason="no transparent huge pages here")


@pytest.fixture
def huge_pages_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BATON_HUGE_PAGES", "0")
    huge_pages.huge_pages_mode.cache_clear()
    yield
    monkeypatch.delenv("BATON_HUGE_PAGES")
    huge_pages.huge_pages_mode.cache_clear()


def mapped(address: int) -> bool:
    """Whether `address` lies in any mapping of this process."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


@pytest.mark.parametrize("shape", [(7, 5), BIG])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_empty_gives_torchs_tensors(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    t = kv_empty(shape, dtype, "cpu")
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    t.fill_(3)
    assert bool((t == 3).all())


@needs_huge_pages
def test_a_large_buffer_asks_for_huge_pages_and_a_small_one_does_not() -> None:
    big = kv_empty(BIG, torch.float32)
    assert big.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert huge_pages.advised(big)[0]
    assert not big.any()  # faulted in when made: zeros
    assert not huge_pages.advised(kv_empty((64, 64), torch.float32))[0]


@needs_huge_pages
def test_the_mapping_goes_with_the_last_tensor_that_views_it() -> None:
    t = kv_empty(BIG, torch.float32)
    layer = t[1]  # a view keeps the mapping
    address = t.data_ptr()
    del t
    gc.collect()
    layer.fill_(1.0)
    assert mapped(address)
    del layer
    gc.collect()
    assert not mapped(address)


class SteppedClock:
    """A clock that moves `step` seconds at every reading: each timed chunk takes `step`."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@needs_huge_pages
def test_huge_pages_slow_to_fault_in_are_given_up_after_the_time_budget(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    chunk = 2 * huge_pages.HUGE_PAGE
    monkeypatch.setattr(huge_pages, "FAULT_CHUNK", chunk)
    nbytes = 5 * chunk + 4096
    budget = nbytes / huge_pages.MIN_FAULT_RATE
    # each chunk takes 0.4 of the whole buffer's budget: the third chunk overruns it
    with caplog.at_level(logging.INFO, logger="runtime.huge_pages"):
        slow = huge_pages._mapped_bytes(nbytes, True, SteppedClock(budget / 2.5))
    assert slow.numel() == nbytes and slow.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert huge_pages.advised(slow[:3 * chunk])[0]
    assert not huge_pages.advised(slow[3 * chunk:])[0]  # 4 KiB pages, not yet faulted in
    assert not slow.any()  # zeros either way
    slow[-1] = 7  # the untouched rest is ordinary memory
    assert int(slow[-1]) == 7
    assert "12 MiB of a 20 MiB buffer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runtime.huge_pages"):
        fast = huge_pages._mapped_bytes(nbytes, True, SteppedClock(budget / 100))
    assert huge_pages.advised(fast)[0] and not fast.any() and not caplog.text
    weights = huge_pages._mapped_bytes(nbytes, False, SteppedClock(budget))  # not timed
    assert huge_pages.advised(weights)[0] and not weights.any() and not caplog.text


def test_baton_huge_pages_0_gives_ordinary_tensors(huge_pages_off: None) -> None:
    assert huge_pages.huge_pages_mode() is None
    t = kv_empty(BIG, torch.float32)
    assert not huge_pages.advised(t)[0]
    assert huge_pages.gather([torch.ones(BIG)]) is None


def test_other_devices_get_torch_empty() -> None:
    t = kv_empty(BIG, torch.float32, "meta")
    assert t.device.type == "meta" and t.shape == BIG


@needs_huge_pages
def test_gather_copies_tensors_into_one_arena_each_on_a_cache_line() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1, 1001, generator=g), torch.randn(1 << 20, generator=g),
               torch.randn(3, 7, generator=g).to(torch.bfloat16), torch.randn(9, generator=g)]
    copies = huge_pages.gather(tensors)
    assert copies is not None
    for original, copy in zip(tensors, copies, strict=True):
        assert torch.equal(original, copy) and copy.dtype == original.dtype
        assert copy.data_ptr() % huge_pages.ALIGN == 0
        assert copy.untyped_storage().data_ptr() == copies[0].untyped_storage().data_ptr()
    ends = [c.data_ptr() + c.numel() * c.element_size() for c in copies]
    assert all(end <= nxt.data_ptr() for end, nxt in zip(ends, copies[1:], strict=False))
    assert huge_pages.advised(copies[1])[0]


def test_gather_leaves_what_it_cannot_place() -> None:
    assert huge_pages.gather([]) is None
    assert huge_pages.gather([torch.ones(10)]) is None  # under 2 MiB: not worth a mapping
    assert huge_pages.gather([torch.ones(1 << 20), torch.ones(64, 64).t()]) is None


def wide_model() -> torch.nn.Module:
    """Linears of 6 MiB in float32: enough for an arena."""
    return tiny_model(seed=3, dtype=torch.float32, hidden_size=256, intermediate_size=512,
                      num_attention_heads=4, num_key_value_heads=2)


@needs_huge_pages
@pytest.mark.skipif(not packing_supported("native", torch.float32, torch.device("cpu")),
                    reason="the engine's own sgemm does not build here")
def test_native_packed_weights_move_into_one_arena_and_compute_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        arena_model = wide_model()
        pack_linears(arena_model, "native")
        linears = model_linears(arena_model)
        storages = {m.packed.untyped_storage().data_ptr() for m in linears}
        assert len(storages) == 1 and all(huge_pages.advised(m.packed)[0] for m in linears)
        monkeypatch.setenv("BATON_HUGE_PAGES", "0")
        huge_pages.huge_pages_mode.cache_clear()
        try:
            plain_model = wide_model()
            pack_linears(plain_model, "native")
        finally:
            monkeypatch.delenv("BATON_HUGE_PAGES")
            huge_pages.huge_pages_mode.cache_clear()
        assert not huge_pages.advised(model_linears(plain_model)[0].packed)[0]
        for arena, plain in zip(linears, model_linears(plain_model), strict=True):
            x = torch.randn(5, arena.in_features, generator=g)
            assert torch.equal(arena(x), plain(x))


@needs_huge_pages
def test_batons_kv_buffers_ask_for_huge_pages() -> None:
    engine = make_engine(tiny_model(), instantiate_scheduler("baton", {}), max_num_seqs=64)
    cache = engine.kv_cache
    assert cache.k.numel() * cache.k.element_size() >= huge_pages.MIN_BYTES
    assert huge_pages.advised(cache.k)[0] and huge_pages.advised(cache.v)[0]
