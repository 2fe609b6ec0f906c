"""How the float32 sgemm's threads share a GEMM (work items claimed at prefill sizes, ranges
sized by each thread's speed at decode sizes): no output bit changes with either."""

import pytest
import torch

from runtime.linear_kernels import packing_supported

pytestmark = pytest.mark.skipif(not packing_supported("native", torch.float32, torch.device("cpu")),
                                reason="the engine's sgemm needs AVX2 and FMA")

DEFAULT_CLAIM_ROWS = 192  # the kernel's row block (`kDefaultClaimRows`)


def set_claim_rows(rows: int) -> int:
    return int(torch.ops.baton_kernels.sgemm_set_claim_rows(rows))


def set_balance(on: bool) -> bool:
    return bool(torch.ops.baton_kernels.sgemm_set_balance(on))


def weights(seed: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    """(generator, weight, gate_up, their packed forms): a linear of 150 features (10 panels,
    the last of 6) and a SwiGLU of 80 (5 gate panels), both of 400 inputs (3 K blocks)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(150, 400, generator=gen)
    gate_up = torch.randn(160, 400, generator=gen)
    return (gen, weight, gate_up, torch.ops.baton_kernels.sgemm_pack(weight),
            torch.ops.baton_kernels.sgemm_pack(gate_up))


@pytest.fixture(autouse=True)
def default_sharing():
    threads = torch.get_num_threads()
    yield
    set_claim_rows(DEFAULT_CLAIM_ROWS)
    set_balance(True)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_claimed_work_changes_no_output_bit(threads: int) -> None:
    """Rows around the row block (192) and its multiples, a K of three blocks the last partial,
    N of 10 panels (groups of 4: the last group short) with a last panel of 6 features, and a
    SwiGLU of 5 gate panels: claimed at every row count against the even split."""
    torch.set_num_threads(threads)
    gen, weight, gate_up, packed, packed_gu = weights(0)
    for rows in (1, 7, 64, 191, 192, 193, 384, 385, 600):
        x = torch.randn(rows, 400, generator=gen)
        outputs = []
        for claim_rows in (0, 1):
            set_claim_rows(claim_rows)
            outputs.append((torch.ops.baton_kernels.sgemm_linear(x, packed, 150, None),
                            torch.ops.baton_kernels.sgemm_swiglu(x, packed_gu, 80)))
        assert torch.equal(outputs[0][0], outputs[1][0]), rows
        assert torch.equal(outputs[0][1], outputs[1][1]), rows
        torch.testing.assert_close(outputs[1][0], x @ weight.T, rtol=1e-4, atol=1e-4)
        gate, up = (x @ gate_up.T).split(80, dim=-1)
        torch.testing.assert_close(outputs[1][1], torch.nn.functional.silu(gate) * up,
                                   rtol=1e-4, atol=1e-4)


def test_claiming_starts_at_a_row_block_and_the_setter_returns_what_it_replaces() -> None:
    assert set_claim_rows(0) == DEFAULT_CLAIM_ROWS
    assert set_claim_rows(500) == 0
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        set_claim_rows(-1)
    assert set_claim_rows(DEFAULT_CLAIM_ROWS) == 500


@pytest.mark.parametrize("threads", [2, 3])
def test_speed_sized_ranges_change_no_output_bit(threads: int) -> None:
    """Decode sizes (below the claiming threshold): each thread's contiguous range sized by
    the speeds measured so far, against even ranges, over many calls so the shares move."""
    torch.set_num_threads(threads)
    gen, _, _, packed, packed_gu = weights(1)
    for rows in (1, 3, 16, 33, 64, 150):
        x = torch.randn(rows, 400, generator=gen)
        set_balance(False)
        even = (torch.ops.baton_kernels.sgemm_linear(x, packed, 150, None),
                torch.ops.baton_kernels.sgemm_swiglu(x, packed_gu, 80))
        set_balance(True)
        for _ in range(20):
            assert torch.equal(torch.ops.baton_kernels.sgemm_linear(x, packed, 150, None), even[0])
            assert torch.equal(torch.ops.baton_kernels.sgemm_swiglu(x, packed_gu, 80), even[1])
    shares = torch.ops.baton_kernels.sgemm_thread_shares()
    assert len(shares) >= threads and all(0.0 < s < threads for s in shares[:threads])
    assert sum(shares[:threads]) == pytest.approx(threads, rel=0.05)


def test_balancing_is_on_by_default_and_the_setter_returns_what_it_replaces() -> None:
    assert set_balance(False) is True
    assert set_balance(True) is False
