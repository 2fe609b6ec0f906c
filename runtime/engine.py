"""The engine: request lifecycle and the step loop. Scheduling decisions come from hooks.

One step: ingest new requests and aborts -> `admit_requests` -> for each forward pass the cache
layout yields: mask, model forward, advance, sample, finish -> observers. A plugin that raises
or breaks a contract fails the requests concerned, with a message naming it; never the engine.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from runtime.contracts import check_batch, check_decision, check_kv_cache, check_passes
from runtime.graph_packages import PackageCacheSpec
from runtime.kv_cache import ForwardBatch, KVCache, PassStats
from runtime.model_runner import EngineLimits, ModelRunner
from runtime.outputs import RequestOutput, extend_output
from runtime.plugins import call_observers, make_plugin_manager, plugin_failure
from runtime.postprocess import TokenProcessor
from runtime.prefill import PrefilledKV
from runtime.request import FinishReason, Request, RequestStatus
from runtime.sampler import sample
from runtime.sampling_params import (
    SamplingParams,
    check_prompt,
    prompt_token_ids,
)
from runtime.scheduling import AdmissionDecision, SchedulerError, SchedulingBudget, StepStats

__all__ = ["Engine", "EngineLimits"]
logger = logging.getLogger(__name__)
Outputs = dict[Request, RequestOutput]


class Engine:
    """Runs requests through a model under one scheduler plugin.

    `add_request` and `abort` may be called from any thread; `step` from one thread only.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, scheduler: object | None = None,
                 scheduler_name: str = "default", limits: EngineLimits = EngineLimits(),
                 observers: tuple[object, ...] = (),
                 clock: Callable[[], float] = time.monotonic,
                 linear_backend: str = "auto", compile_model: bool | str = False,
                 attention_backend: str = "auto",
                 static_decode_rows: tuple[int, ...] = (),
                 static_graph_cache: PackageCacheSpec | None = None) -> None:
        self.tokenizer, self.clock = tokenizer, clock
        self.scheduler, self.scheduler_name = scheduler, scheduler_name
        self.runner = ModelRunner(model, limits, linear_backend, compile_model, attention_backend,
                                  static_decode_rows, static_graph_cache)
        self.model, self.device, self.dtype = model, self.runner.device, self.runner.dtype
        self.shape, self.limits = self.runner.shape, self.runner.cache_limits
        self.max_model_len = self.shape.max_model_len
        self.observers = tuple(o for o in observers if o is not None)
        self.pm = make_plugin_manager(scheduler, scheduler_name, self.observers)
        self.kv_cache: KVCache = self._make_kv_cache()
        eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.processor = TokenProcessor(tokenizer, eos, self.max_model_len)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._inbox: collections.deque[Request] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._by_id: dict[str, Request] = {}
        self._prefilled: dict[Request, tuple[PrefilledKV, torch.Tensor]] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_step: StepStats | None = None

    def _make_kv_cache(self) -> KVCache:
        try:
            cache = check_kv_cache(self.pm.hook.make_kv_cache(
                shape=self.shape, limits=self.limits, device=self.device, dtype=self.dtype))
        except Exception as exc:
            raise SchedulerError(self._plugin_error(exc, "make_kv_cache failed")) from exc
        cache.decode_kernel = self.runner.attention.kernel
        return cache

    def make_request(self, prompt: str | Sequence[int], params: SamplingParams,
                     request_id: str | None = None, arrival_time: float | None = None) -> Request:
        """Tokenize and validate a request (raises InvalidParameterError) without queueing it."""
        text, token_ids = prompt_token_ids(self.tokenizer, prompt)
        check_prompt(token_ids, params.max_tokens, self.shape.vocab_size, self.max_model_len)
        req = Request(request_id or f"req-{next(self._ids)}", token_ids, params,
                      arrival_time=self.clock() if arrival_time is None else arrival_time,
                      prompt=text)
        self.processor.start(req)
        return req

    def add_request(self, prompt: str | Sequence[int] | Request, params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> Request:
        """Queue a request (thread-safe); it is considered for admission at the next step."""
        req = prompt if isinstance(prompt, Request) else self.make_request(
            prompt, params or SamplingParams(), request_id, arrival_time)
        self._inbox.append(req)
        return req

    @property
    def accepts_prefilled(self) -> bool:
        """True when the KV layout can embed K/V computed elsewhere (`insert_prefilled`)."""
        return callable(getattr(self.kv_cache, "insert_prefilled", None))

    def add_prefilled(self, request: Request, kv: PrefilledKV, logits: torch.Tensor) -> Request:
        """Queue a request whose prompt was prefilled elsewhere (thread-safe).

        `kv` holds the prompt's K/V (one row), `logits` `(1, V)` its last token's. Admission
        is the scheduler's as for any request; once admitted, the layout embeds `kv`
        (`insert_prefilled`) and the first token is sampled here from `logits` with the
        request's own params and seed, so this engine never runs the prompt.
        """
        if not self.accepts_prefilled:
            raise SchedulerError(
                f"scheduler {self.scheduler_name!r} cannot take prefilled K/V: its KV layout "
                f"({type(self.kv_cache).__name__}) has no insert_prefilled(requests, kv)")
        if kv.lengths != (request.prompt_len,) or tuple(logits.shape[:1]) != (1,):
            raise ValueError(f"{request.request_id}: prefilled K/V of lengths {kv.lengths} and "
                             f"logits {tuple(logits.shape)} do not fit a {request.prompt_len}-"
                             "token prompt")
        self._prefilled[request] = (kv, logits)
        self._inbox.append(request)
        return request

    def abort(self, request_id: str) -> None:
        """Abort a request at the start of the next step (thread-safe); unknown ids are ignored."""
        self._aborts.append(request_id)

    def warm_up(self) -> float:
        """Run throwaway requests through the scheduler and layout; return the seconds taken.

        Lazy work (a compiled graph per pass shape: several tokens, one token, a solo row)
        then happens before serving instead of inside the first requests' latency. Observers
        do not see these requests, the step count starts again at zero, and the KV layout is
        built afresh, so nothing it learned from the warm-up (such as Orca's timings of its
        attention variants, inflated by compiling) carries over.
        """
        if self.has_unfinished():
            raise RuntimeError("warm_up() needs an idle engine")
        start = time.perf_counter()
        self.runner.build_static_graphs()
        for plugin in self.observers:
            self.pm.unregister(plugin)
        vocab, ids = self.shape.vocab_size, itertools.count()
        try:
            # (prompt, output) lengths: a pair, one outliving the other; solos of 2 and 1 tokens
            for lengths in (((3, 3), (2, 6)), ((2, 2),), ((1, 2),)):
                reqs = [self.add_request([(7 * i + 1) % vocab] * prompt_len,
                                         SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                         request_id=f"warm-up-{next(ids)}")
                        for i, (prompt_len, max_tokens) in enumerate(lengths)]
                while self.has_unfinished():
                    self.step()
                failed = [r.error for r in reqs if r.error]
                if failed:
                    raise RuntimeError(f"warm-up request failed: {failed[0]}")
        finally:
            for plugin in self.observers:
                self.pm.register(plugin)
        self.num_steps, self.last_step = 0, None
        self._reset_kv_cache()
        return time.perf_counter() - start

    def _reset_kv_cache(self) -> None:
        """The layout empty and unlearned: reset in place where it can, else made afresh."""
        try:
            done = self.kv_cache.reset()
        except Exception as exc:
            raise SchedulerError(self._plugin_error(exc, "kv_cache.reset() failed")) from exc
        if done:
            if not self.kv_cache.is_empty():
                broken = SchedulerError("kv_cache.reset() returned True, but is_empty() is False")
                raise SchedulerError(self._plugin_error(broken, "kv_cache.reset()"))
            return
        del self.kv_cache  # the engine's reference (a scheduler that keeps one keeps it alive)
        self.kv_cache = self._make_kv_cache()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._inbox or self._aborts)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._inbox)

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the progress of every request that advanced."""
        outputs: Outputs = {}
        self._ingest(outputs)
        decision = self._admit(outputs)
        passes, seconds = self._run_passes(outputs)
        self.num_steps += 1
        if passes:
            self.last_step = StepStats(
                self.num_steps, tuple(passes), tuple(seconds), self.kv_cache.memory_stats(),
                len(self.running), self.num_waiting, len(decision.admit), len(decision.preempt),
                sum(1 for o in outputs.values() if o.finished))
            call_observers(self.pm.hook.on_step_end, stats=self.last_step)
        return list(outputs.values())

    def _ingest(self, outputs: Outputs) -> None:
        while self._inbox:
            req = self._inbox.popleft()
            self._by_id[req.request_id] = req
            self.waiting.append(req)
        while self._aborts:
            req = self._by_id.get(self._aborts.popleft())
            if req is not None and not req.status.done:
                self._finish(req, FinishReason.ABORT, outputs)

    def _admit(self, outputs: Outputs) -> AdmissionDecision:
        """Ask `admit_requests`, then preempt and admit as the checked decision says."""
        decision = self._decide(outputs)
        for req in decision.preempt:
            self._free(req)
            self.running.remove(req)
            req.num_computed_tokens = 0
            req.num_preemptions += 1
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
        now = self.clock()
        for req in decision.admit:
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            prefilled = self._prefilled.pop(req, None)
            try:
                if prefilled is None:
                    self.kv_cache.add(req)
                else:
                    self.kv_cache.insert_prefilled([req], prefilled[0])
            except Exception as exc:
                error = self._plugin_error(exc, "the KV cache failed to add the request")
                self._fail((req,), outputs, error)
                continue
            self.running.append(req)
            if prefilled is not None:
                self._first_token(req, prefilled[1], outputs)
        return decision

    def _first_token(self, req: Request, logits: torch.Tensor, outputs: Outputs) -> None:
        """A prefilled request's prompt is cached: sample its first token as a pass would."""
        req.num_computed_tokens = req.prompt_len
        try:
            result = sample(logits.to(self.device), [req])
        except Exception as exc:  # a bad payload fails its own request only
            logger.exception("sampling the first token of %s failed", req.request_id)
            self._fail((req,), outputs, f"sampling the prefilled first token failed: {exc!r}")
            return
        token = result.token_ids[0]
        reason, text = self.processor.append(req, token, result.logprobs[0], self.clock())
        outputs[req] = extend_output(outputs.get(req), req, (token,), text)
        if reason is not None:
            self._finish(req, reason, outputs)

    def _decide(self, outputs: Outputs) -> AdmissionDecision:
        """The hook's decision, checked; if it raises or is invalid, fail whom it concerns."""
        decision = None
        try:
            budget = SchedulingBudget(self.limits.max_num_seqs, self.max_model_len,
                                      self.kv_cache.kv_cache_tokens, self.kv_cache.kv_free_tokens())
            decision = self.pm.hook.admit_requests(
                waiting=tuple(self.waiting), running=tuple(self.running), budget=budget,
                kv_cache=self.kv_cache)
            return check_decision(decision, self.waiting, self.running, self.limits.max_num_seqs)
        except Exception as exc:  # an invalid decision fails the requests it names
            named = (*decision.admit, *decision.preempt) if isinstance(exc, SchedulerError) \
                and isinstance(decision, AdmissionDecision) else tuple(self.waiting)
            self._fail(named, outputs, self._plugin_error(exc, "admission failed"))
            return AdmissionDecision()

    def _run_passes(self, outputs: Outputs) -> tuple[list[PassStats], list[float]]:
        """Run the passes the layout yields, one by one; if it breaks, fail the running requests."""
        passes: list[PassStats] = []
        seconds: list[float] = []
        try:
            with contextlib.closing(check_passes(self.kv_cache.forward_batches(self.running))) \
                    as batches:
                for batch in batches:
                    started = time.perf_counter()
                    passes.append(self.kv_cache.pass_stats(check_batch(batch, self.running)))
                    if not self._run_pass(batch, outputs):
                        break
                    seconds.append(time.perf_counter() - started)
        except Exception as exc:
            self._fail(tuple(self.running), outputs, self._plugin_error(exc, "step failed"))
        return passes, seconds

    def _run_pass(self, batch: ForwardBatch, outputs: Outputs) -> bool:
        """Run one pass, advance its requests, append their tokens; False if the pass failed.

        The mask hook's answer overrides the mask the layout built into the batch.
        """
        try:
            mask = self.pm.hook.build_attention_mask(batch=batch, kv_cache=self.kv_cache)
            result = self.runner.run(batch, self.kv_cache, batch.mask if mask is None else mask)
        except Exception as exc:  # one failing pass fails its own requests only
            self._fail(batch.requests, outputs, self._plugin_error(exc, "forward pass failed"))
            return False
        for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            req.num_computed_tokens += n
        now = self.clock()
        for req, token, logprob in zip(batch.sampled_requests, result.token_ids, result.logprobs,
                                       strict=True):
            reason, text = self.processor.append(req, token, logprob, now)
            outputs[req] = extend_output(outputs.get(req), req, (token,), text)
            if reason is not None:
                self._finish(req, reason, outputs)
        return True

    def _plugin_error(self, exc: Exception, what: str) -> str:
        """Log a plugin failure (its traceback unless a contract check caught it); the message."""
        message = plugin_failure(self.scheduler_name, self.scheduler, exc, what)
        logger.error("%s", message, exc_info=None if isinstance(exc, SchedulerError) else exc)
        return message

    def _fail(self, requests: Iterable[Request], outputs: Outputs, error: str) -> None:
        for req in requests:
            if isinstance(req, Request) and not req.status.done:
                self._finish(req, FinishReason.ERROR, outputs, error=error)

    def _free(self, req: Request) -> None:
        try:
            self.kv_cache.free(req)
        except Exception as exc:  # a leak the no-leak checks report; the request still leaves
            self._plugin_error(exc, f"kv_cache.free({req.request_id}) failed")

    def _finish(self, req: Request, reason: FinishReason, outputs: Outputs,
                error: str | None = None) -> None:
        """Leave the engine: free cache space first, then tell observers and the caller."""
        self._free(req)
        self._prefilled.pop(req, None)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status, req.finish_reason, req.error = reason.status, reason, error
        req.finished_time = self.clock()
        self._by_id.pop(req.request_id, None)
        outputs[req] = extend_output(outputs.get(req), req, (), self.processor.flush(req), True,
                                     reason, error)
        call_observers(self.pm.hook.on_request_finished, request=req)

    def generate(self, prompts: Iterable[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Request]:
        """Run prompts to completion and return their finished requests in input order."""
        prompts = list(prompts)
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        while self.has_unfinished():
            self.step()
        return reqs
