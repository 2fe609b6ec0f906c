"""The engine: request lifecycle and the step loop. Scheduling decisions come from hooks.

One step: ingest new requests and aborts -> `admit_requests` -> for each forward pass the
cache layout yields: `build_attention_mask`, model forward, `commit`, sample, finish -> observers.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from runtime.contracts import check_batch, check_decision, check_kv_cache
from runtime.kv_cache import CacheLimits, KVCache, ModelShape, PassStats, kv_elements_per_token
from runtime.kv_sizing import kv_capacity
from runtime.linear_kernels import apply_linear_backend
from runtime.outputs import RequestOutput
from runtime.plugins import make_plugin_manager
from runtime.postprocess import TokenProcessor
from runtime.request import FinishReason, Request, RequestStatus
from runtime.sampler import sample
from runtime.sampling_params import InvalidParameterError, SamplingParams
from runtime.scheduling import AdmissionDecision, SchedulerError, SchedulingBudget, StepStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """Engine-wide limits; `None` context/capacity are derived from the model and memory.

    KV capacity: `kv_cache_tokens` when given, else `kv_cache_memory` (`runtime.kv_sizing`:
    `auto`, a fraction of available memory, or a size such as `4GiB`).
    """

    max_num_seqs: int = 64
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    kv_cache_memory: str | float | None = None


class Engine:
    """Runs requests through a model under one scheduler plugin.

    `add_request` and `abort` may be called from any thread; `step` from one thread only.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, scheduler: object | None = None,
                 scheduler_name: str = "default", limits: EngineLimits = EngineLimits(),
                 observers: tuple[object, ...] = (),
                 clock: Callable[[], float] = time.monotonic,
                 linear_backend: str = "auto") -> None:
        self.model = model
        self.linear_kernels = apply_linear_backend(model, linear_backend)
        self.tokenizer = tokenizer
        self.scheduler_name = scheduler_name
        self.clock = clock
        cfg = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_model_len = min(limits.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        self.shape = ModelShape(cfg.num_hidden_layers, cfg.num_attention_heads,
                                cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size,
                                self.max_model_len)
        element_size = torch.empty((), dtype=self.dtype).element_size()
        self.kv_capacity = kv_capacity(
            kv_elements_per_token(self.shape) * element_size, limits.max_num_seqs,
            self.max_model_len, limits.kv_cache_tokens, limits.kv_cache_memory, self.device)
        logger.info("KV cache capacity: %d tokens, %.2f GiB (%s)", self.kv_capacity.tokens,
                    self.kv_capacity.gib, self.kv_capacity.reason)
        self.limits = CacheLimits(limits.max_num_seqs, self.max_model_len,
                                  self.kv_capacity.tokens)
        self.pm = make_plugin_manager(scheduler, scheduler_name, observers)
        try:
            cache = self.pm.hook.make_kv_cache(
                shape=self.shape, limits=self.limits, device=self.device, dtype=self.dtype)
        except Exception as exc:
            raise SchedulerError(f"scheduler {scheduler_name!r}: make_kv_cache raised "
                                 f"{type(exc).__name__}: {exc}") from exc
        self.kv_cache: KVCache = check_kv_cache(cache, scheduler_name)
        eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.processor = TokenProcessor(tokenizer, eos, self.max_model_len)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._inbox: collections.deque[Request] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._by_id: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_step: StepStats | None = None

    def make_request(self, prompt: str | Sequence[int], params: SamplingParams,
                     request_id: str | None = None, arrival_time: float | None = None) -> Request:
        """Tokenize and validate a request (raises InvalidParameterError) without queueing it."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameterError("text prompts need a tokenizer", "prompt")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        self._validate(token_ids, params)
        req = Request(request_id or f"req-{next(self._ids)}", token_ids, params,
                      arrival_time=self.clock() if arrival_time is None else arrival_time,
                      prompt=text)
        self.processor.start(req)
        return req

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        n = len(token_ids)
        if n == 0:
            raise InvalidParameterError("the prompt is empty", "prompt")
        if any(t < 0 or t >= self.shape.vocab_size for t in token_ids):
            raise InvalidParameterError(
                f"prompt token ids must be in [0, {self.shape.vocab_size})", "prompt")
        if n >= self.max_model_len:
            raise InvalidParameterError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your request has {n} input tokens. Please reduce the length of the input.",
                "prompt")
        if n + params.max_tokens > self.max_model_len:
            raise InvalidParameterError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n + params.max_tokens} tokens ({n} in the input, "
                f"{params.max_tokens} in the completion). Please reduce the length of the "
                "input or completion.", "max_tokens")

    def add_request(self, prompt: str | Sequence[int] | Request, params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> Request:
        """Queue a request (thread-safe); it is considered for admission at the next step."""
        req = prompt if isinstance(prompt, Request) else self.make_request(
            prompt, params or SamplingParams(), request_id, arrival_time)
        self._inbox.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Abort a request at the start of the next step (thread-safe); unknown ids are ignored."""
        self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._inbox or self._aborts)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._inbox)

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the progress of every request that advanced."""
        outputs: dict[Request, RequestOutput] = {}
        self._ingest(outputs)
        decision = self._admit(outputs)
        passes: list[PassStats] = []
        seconds: list[float] = []
        batches = None
        try:
            batches = self.kv_cache.forward_batches(self.running)
            for batch in batches:
                started = time.perf_counter()
                check_batch(batch, self.running, self.scheduler_name)
                passes.append(self.kv_cache.pass_stats(batch))
                try:
                    logits = self._forward(batch)
                except Exception as exc:  # one failing pass fails its requests only
                    logger.exception("forward pass failed")
                    self._fail(batch.requests, outputs,
                               f"forward pass failed: {type(exc).__name__}: {exc}")
                    break
                for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
                    req.num_computed_tokens += n
                result = sample(logits, batch.sampled_requests)
                now = self.clock()
                for req, token, lp in zip(batch.sampled_requests, result.token_ids,
                                          result.logprobs, strict=True):
                    self._append_token(req, token, lp, now, outputs)
                seconds.append(time.perf_counter() - started)
        except Exception as exc:  # a broken layout fails this step's requests, not the engine
            logger.exception("step failed")
            self._fail(tuple(self.running), outputs, str(exc) if isinstance(exc, SchedulerError)
                       else f"scheduler {self.scheduler_name!r}: step failed: "
                            f"{type(exc).__name__}: {exc}")
        finally:
            if batches is not None:
                batches.close()
        self.num_steps += 1
        if passes:
            self.last_step = StepStats(
                self.num_steps, tuple(passes), tuple(seconds), self.kv_cache.memory_stats(),
                len(self.running), self.num_waiting, len(decision.admit), len(decision.preempt),
                sum(1 for o in outputs.values() if o.finished))
            self._observe("on_step_end", stats=self.last_step)
        return list(outputs.values())

    def _fail(self, requests: Iterable[Request], outputs: dict[Request, RequestOutput],
              error: str) -> None:
        for req in requests:
            if isinstance(req, Request) and not req.status.done:
                self._finish(req, FinishReason.ERROR, outputs, error=error)

    def _free(self, req: Request) -> None:
        try:
            self.kv_cache.free(req)
        except Exception:  # a leak the no-leak checks report; the request still leaves
            logger.exception("kv_cache.free failed for %s", req.request_id)

    def _observe(self, hook: str, **kwargs) -> None:
        """Call an observer hook; a raising observer is logged, never fatal to the step."""
        try:
            getattr(self.pm.hook, hook)(**kwargs)
        except Exception:
            logger.exception("observer hook %s raised", hook)

    def _forward(self, batch) -> torch.Tensor:
        mask = self.pm.hook.build_attention_mask(batch=batch, kv_cache=self.kv_cache)
        with torch.inference_mode():
            hidden = self.model(batch.input_ids, batch.positions,
                                self.kv_cache.attention(batch), mask)
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.sample_indices)
            logits = self.model.compute_logits(rows)
        self.kv_cache.commit(batch)
        return logits

    def _ingest(self, outputs: dict[Request, RequestOutput]) -> None:
        while self._inbox:
            req = self._inbox.popleft()
            self._by_id[req.request_id] = req
            self.waiting.append(req)
        while self._aborts:
            req = self._by_id.get(self._aborts.popleft())
            if req is not None and not req.status.done:
                self._finish(req, FinishReason.ABORT, outputs)

    def _admit(self, outputs: dict[Request, RequestOutput]) -> AdmissionDecision:
        name = self.scheduler_name
        decision = None
        try:
            budget = SchedulingBudget(self.limits.max_num_seqs, self.max_model_len,
                                      self.limits.kv_capacity_tokens,
                                      self.kv_cache.num_free_tokens())
            decision = self.pm.hook.admit_requests(
                waiting=tuple(self.waiting), running=tuple(self.running), budget=budget,
                kv_cache=self.kv_cache)
            check_decision(decision, self.waiting, self.running, self.limits.max_num_seqs, name)
        except SchedulerError as exc:  # fail the requests the invalid decision names
            logger.error("%s", exc)
            named = (*decision.admit, *decision.preempt) \
                if isinstance(decision, AdmissionDecision) else tuple(self.waiting)
            self._fail(named, outputs, str(exc))
            return AdmissionDecision()
        except Exception as exc:  # admission itself broke: fail the requests it was deciding on
            logger.exception("admission failed")
            self._fail(tuple(self.waiting), outputs, f"scheduler {name!r}: admission failed: "
                       f"{type(exc).__name__}: {exc}")
            return AdmissionDecision()
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
            try:
                self.kv_cache.add(req)
            except Exception as exc:
                logger.exception("kv_cache.add failed")
                self._fail((req,), outputs, f"scheduler {name!r}: the KV cache failed to add "
                           f"the request: {type(exc).__name__}: {exc}")
                continue
            self.running.append(req)
        return decision

    def _append_token(self, req: Request, token: int, logprob, now: float,
                      outputs: dict[Request, RequestOutput]) -> None:
        reason, delta = self.processor.append(req, token, logprob, now)
        prev = outputs.get(req)
        tokens = (prev.new_token_ids if prev else ()) + (token,)
        text = (prev.text_delta if prev else "") + delta
        outputs[req] = RequestOutput(req, tokens, text, False)
        if reason is not None:
            self._finish(req, reason, outputs)

    def _finish(self, req: Request, reason: FinishReason, outputs: dict[Request, RequestOutput],
                error: str | None = None) -> None:
        """Leave the engine: free cache space first, then tell observers and the caller."""
        self._free(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.ABORTED if reason in (FinishReason.ABORT, FinishReason.ERROR) \
            else RequestStatus.FINISHED
        req.finish_reason = reason
        req.error = error
        req.finished_time = self.clock()
        self._by_id.pop(req.request_id, None)
        delta = self.processor.flush(req)
        prev = outputs.get(req)
        outputs[req] = RequestOutput(req, prev.new_token_ids if prev else (),
                                     (prev.text_delta if prev else "") + delta, True, reason, error)
        self._observe("on_request_finished", request=req)

    def generate(self, prompts: Iterable[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Request]:
        """Run prompts to completion and return their finished requests in input order."""
        prompts = list(prompts)
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        while self.has_unfinished():
            self.step()
        return reqs
