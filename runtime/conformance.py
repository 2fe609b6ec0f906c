"""The scheduler conformance suite: one pytest base class any plugin's tests can subclass.

    from runtime.conformance import SchedulerConformance

    class TestMyScheduler(SchedulerConformance):
        scheduler = "sjf"                          # the entry-point name, as in YAML
        scheduler_options = {"max_wait_steps": 4}  # the YAML `scheduler_options`

pytest then runs every `test_*` below against the installed plugin: selection by YAML name,
greedy tokens equal to solo runs under random arrivals and aborts (also over a bfloat16 KV
cache, `kv_cache_dtype`), seeded sampling independent
of the batch, no leaks after finish and abort, abort handling, and the hook contracts. Each test
is a call to a plain function of `runtime.testing`, usable without pytest; this module needs
pytest (the `test` extra).
"""

from __future__ import annotations

import pytest
import torch
import yaml

from runtime.config import build_config
from runtime.plugins import instantiate_scheduler, load_scheduler_class
from runtime.request import FinishReason
from runtime.testing import (
    GREEDY,
    SchedulerFactory,
    check_abort_handling,
    check_hook_contracts,
    check_no_leak,
    check_scheduling_invariance,
    make_engine,
    random_arrivals,
    run_alone,
    run_mix,
    tiny_model,
)


class SchedulerConformance:
    """Subclass in a test module and set `scheduler` (and `scheduler_options`); see the top."""

    scheduler: str | None = None
    scheduler_options: dict = {}  # read-only; mirrors the YAML key
    max_num_seqs: int = 4
    model_seed: int = 3

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_model(cls) -> torch.nn.Module:
        return tiny_model(seed=cls.model_seed)

    @pytest.fixture
    def conformance_name(self) -> str | None:
        """The entry-point name under test; None tests the runtime's built-in defaults."""
        return self.scheduler

    @pytest.fixture
    def conformance_factory(self, conformance_name: str | None) -> SchedulerFactory:
        """A fresh scheduler per engine; override to test a class that is not installed yet."""
        if conformance_name is None:
            return lambda: None
        cls = load_scheduler_class(conformance_name)
        return lambda: cls(**self.scheduler_options)

    def test_selected_by_yaml_name(self, conformance_name, conformance_model, tmp_path) -> None:
        if conformance_name is None:
            pytest.skip("the built-in defaults have no entry point")
        path = tmp_path / "config.yaml"
        path.write_text(
            yaml.safe_dump(
                {"scheduler": conformance_name, "scheduler_options": dict(self.scheduler_options)}
            )
        )
        config = build_config(path)
        scheduler = instantiate_scheduler(config.scheduler, config.scheduler_options)
        assert type(scheduler) is load_scheduler_class(conformance_name)
        engine = make_engine(conformance_model, scheduler, name=config.scheduler)
        req = engine.generate([[1, 2, 3]], GREEDY)[0]
        assert req.finish_reason is FinishReason.LENGTH and len(req.output_token_ids) == 6

    @pytest.mark.parametrize("seed", [0, 1])
    def test_greedy_tokens_equal_solo_tokens(
        self, conformance_model, conformance_factory, seed: int
    ) -> None:
        arrivals = random_arrivals(
            seed,
            num_requests=9,
            vocab_size=128,
            prompt_len=(1, 24),
            max_tokens=(1, 10),
            max_arrival_step=8,
            abort_fraction=0.2,
        )
        check_scheduling_invariance(
            conformance_model, conformance_factory, arrivals, max_num_seqs=self.max_num_seqs
        )

    def test_greedy_tokens_equal_solo_tokens_over_a_16_bit_cache(
        self, conformance_model, conformance_factory
    ) -> None:
        """`kv_cache_dtype: bfloat16`: the layout stores K/V as `kv_dtype` and still gives
        every request its solo tokens (SDPA needs keys of the query's dtype: widen them)."""
        arrivals = random_arrivals(
            2,
            num_requests=7,
            vocab_size=128,
            prompt_len=(1, 20),
            max_tokens=(1, 8),
            max_arrival_step=6,
            abort_fraction=0.2,
        )
        check_scheduling_invariance(
            conformance_model, conformance_factory, arrivals, max_num_seqs=self.max_num_seqs,
            kv_cache_dtype="bfloat16",
        )

    def test_more_requests_than_rows(self, conformance_model, conformance_factory) -> None:
        arrivals = random_arrivals(
            7,
            num_requests=7,
            vocab_size=128,
            prompt_len=(2, 16),
            max_tokens=(3, 3),
            max_arrival_step=0,
        )
        check_scheduling_invariance(
            conformance_model, conformance_factory, arrivals, max_num_seqs=3
        )

    def test_tight_kv_capacity(self, conformance_model, conformance_factory) -> None:
        arrivals = random_arrivals(
            13,
            num_requests=6,
            vocab_size=128,
            prompt_len=(2, 16),
            max_tokens=(2, 6),
            max_arrival_step=2,
        )
        check_scheduling_invariance(
            conformance_model,
            conformance_factory,
            arrivals,
            max_num_seqs=self.max_num_seqs,
            kv_cache_tokens=48,
        )

    def test_seeded_sampling_independent_of_batch(
        self, conformance_model, conformance_factory
    ) -> None:
        arrivals = random_arrivals(
            11,
            num_requests=6,
            vocab_size=128,
            prompt_len=(1, 12),
            max_tokens=(4, 8),
            max_arrival_step=4,
            temperature=1.0,
        )
        kwargs = {"max_num_seqs": self.max_num_seqs}
        mixed, _ = run_mix(conformance_model, conformance_factory, arrivals, **kwargs)
        for i, arr in enumerate(arrivals):
            solo = run_alone(conformance_model, conformance_factory, arr, **kwargs)
            assert mixed.tokens[i] == solo, f"request {i}: batched {mixed.tokens[i]} != {solo}"

    def test_no_leak_after_finish_and_abort(self, conformance_model, conformance_factory) -> None:
        arrivals = random_arrivals(
            17,
            num_requests=8,
            vocab_size=128,
            prompt_len=(1, 20),
            max_tokens=(1, 12),
            max_arrival_step=5,
            abort_fraction=0.5,
        )
        _, engine = run_mix(
            conformance_model, conformance_factory, arrivals, max_num_seqs=self.max_num_seqs
        )
        check_no_leak(engine)

    def test_abort_handling(self, conformance_model, conformance_factory) -> None:
        check_abort_handling(conformance_model, conformance_factory, max_num_seqs=self.max_num_seqs)

    def test_hook_contracts(self, conformance_model, conformance_factory) -> None:
        check_hook_contracts(conformance_model, conformance_factory, max_num_seqs=self.max_num_seqs)
