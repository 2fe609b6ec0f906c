"""The SDPA backends an engine pass lets torch pick (`runtime.sdpa_backends`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baton_plugin import BatonScheduler
from orca_plugin import OrcaScheduler
from runtime.sampling_params import SamplingParams
from runtime.sdpa_backends import pass_sdpa_backends
from runtime.testing import make_engine, tiny_model


def test_cpu_pass_keeps_torchs_choice() -> None:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with pass_sdpa_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_cuda_pass_leaves_out_cudnn_and_restores_it() -> None:
    """The flags are process-wide: set for the pass only, whatever the pass raises."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with (pytest.raises(RuntimeError, match="a failing pass"),
          pass_sdpa_backends(torch.device("cuda", 0))):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        raise RuntimeError("a failing pass")
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheduler", [BatonScheduler, OrcaScheduler])
def test_cuda_engine_passes_call_sdpa_without_cudnn(monkeypatch, scheduler) -> None:
    """Every SDPA call of a bfloat16 engine on CUDA (decode rows under a mask, prompts) runs
    with cuDNN attention off."""
    seen: list[bool] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_model(seed=3).init_weights(3, std=0.3).to("cuda", torch.bfloat16)
    engine = make_engine(model, scheduler(attention="fused") if scheduler is OrcaScheduler
                         else scheduler(), scheduler.__name__)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    for n in (3, 9, 17):
        engine.add_request(list(range(1, n + 1)), params)
    while engine.has_unfinished():
        engine.step()
    assert seen and not any(seen)
