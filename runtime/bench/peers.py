"""Peer engines on the same model folder and workload: Hugging Face `transformers`.

- `transformers`: static batched `generate` (left-padded batches run to completion, the
  baseline users start from), token times taken from a streamer called once per step.
- `transformers-cb`: its continuous-batching manager (paged KV cache, FIFO scheduling), fed
  at each request's arrival time, token times from its own per-token timestamps.
Each adapter raises `PeerUnavailable` with the reason when it cannot run here.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from runtime.bench.metrics import RequestTrace, RunTrace
from runtime.bench.offline import progress_bar, wait_until
from runtime.bench.workload import BenchRequest

PEERS = ("transformers", "transformers-cb")


class PeerUnavailable(RuntimeError):
    """A peer engine cannot run here (not installed, too old); the message says why."""


def _load_hf(model_dir: Path, dtype: torch.dtype, device: torch.device):
    """The folder in `transformers`, in the dtype and on the device our contenders use."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise PeerUnavailable(f"transformers is not installed ({exc})") from exc
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()


class _StepClock:
    """A `generate` streamer: the first put is the prompt, every later put is one new token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self) -> None:
        pass


class TransformersStatic:
    """`model.generate` on left-padded batches of up to `max_batch_size` arrived requests."""

    label = "transformers"

    def __init__(self, model_dir: Path, max_batch_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.model = _load_hf(model_dir, dtype, torch.device(device))
        self.max_batch_size = max_batch_size

    def _generate(self, batch: Sequence[BenchRequest]) -> list[float]:
        from transformers import GenerationConfig

        width = max(r.prompt_len for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row ends at the same column
            ids[i, width - r.prompt_len :] = torch.tensor(r.prompt_token_ids)
            mask[i, width - r.prompt_len :] = 1
        steps = max(r.output_len for r in batch)
        config = GenerationConfig(
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        clock = _StepClock()
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids.to(self.model.device),
                attention_mask=mask.to(self.model.device),
                generation_config=config,
                streamer=clock,
            )
        return clock.times

    def warmup(self) -> None:
        self._generate([BenchRequest(0, 0.0, (20,) * 8, 4), BenchRequest(1, 0.0, (21,) * 12, 4)])

    def run(self, requests: Sequence[BenchRequest], progress: bool = False) -> RunTrace:
        pending = collections.deque(sorted(requests, key=lambda r: r.arrival))
        traces = []
        start = time.perf_counter()
        with progress_bar(self.label, len(requests), progress) as bar:
            while pending:
                wait_until(time.perf_counter, start + pending[0].arrival)
                now = time.perf_counter() - start
                batch = []
                while pending and pending[0].arrival <= now and len(batch) < self.max_batch_size:
                    batch.append(pending.popleft())
                times = self._generate(batch)
                for r in batch:  # a row's own tokens are its first output_len steps
                    traces.append(
                        RequestTrace(
                            r.prompt_len,
                            r.output_len,
                            start + r.arrival,
                            times[: r.output_len],
                            len(times) >= r.output_len,
                        )
                    )
                bar.update(len(batch))
        return RunTrace(traces, start, time.perf_counter())


class TransformersContinuous:
    """`transformers`' continuous-batching manager, requests added at their arrival times."""

    label = "transformers-cb"

    def __init__(
        self,
        model_dir: Path,
        max_batch_size: int,
        max_total_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.model = _load_hf(model_dir, dtype, torch.device(device))
        if not hasattr(self.model, "continuous_batching_context_manager"):
            import transformers

            raise PeerUnavailable(
                f"transformers {transformers.__version__} has no continuous "
                "batching manager (needs a version with generate_batch)"
            )
        self.max_batch_size = max_batch_size
        self.max_total_len = max_total_len

    def _configs(self, requests: Sequence[BenchRequest]):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        page = 64
        pages_per_request = -(-self.max_total_len // page)
        cb = ContinuousBatchingConfig(
            page_size=page,
            num_blocks=self.max_batch_size * pages_per_request + 8,
            max_batch_tokens=max(1024, max(r.prompt_len for r in requests) + 1),
            max_requests_per_batch=self.max_batch_size,
            allow_block_sharing=False,
        )
        gen = GenerationConfig(
            do_sample=False,
            eos_token_id=-1,
            pad_token_id=0,
            max_new_tokens=max(r.output_len for r in requests),
        )
        return gen, cb

    def warmup(self) -> None:
        self.run([BenchRequest(0, 0.0, (20,) * 8, 4), BenchRequest(1, 0.0, (21,) * 12, 4)])

    def run(self, requests: Sequence[BenchRequest], progress: bool = False) -> RunTrace:
        gen, cb = self._configs(requests)
        pending = collections.deque(sorted(requests, key=lambda r: r.arrival))
        by_id = {f"bench-{r.index}": r for r in requests}
        results = {}
        with (
            self.model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cb, warmup=False
            ) as mgr,
            progress_bar(self.label, len(requests), progress) as bar,
        ):
            start = time.perf_counter()
            while len(results) < len(requests):
                now = time.perf_counter() - start
                while pending and pending[0].arrival <= now:
                    r = pending.popleft()
                    mgr.add_request(
                        list(r.prompt_token_ids),
                        f"bench-{r.index}",
                        max_new_tokens=r.output_len,
                        record_timestamps=True,
                        eos_token_id=-1,
                    )
                wait = 0.5 if not pending else pending[0].arrival - now
                out = mgr.get_result(timeout=min(0.5, max(0.005, wait)))
                if out is not None and out.is_finished():
                    results[out.request_id] = out
                    bar.update(1)
                elif out is None and not mgr.is_running():
                    raise RuntimeError("transformers continuous batching loop stopped")
            end = time.perf_counter()
        traces = []
        for rid, out in results.items():
            r = by_id[rid]
            times = list(out.timestamps or [])
            ok = out.error is None and len(out.generated_tokens) == r.output_len
            traces.append(
                RequestTrace(
                    r.prompt_len,
                    len(out.generated_tokens),
                    start + r.arrival,
                    times,
                    ok,
                    out.error or "",
                )
            )
        return RunTrace(traces, start, end)


def make_peer(name: str, model_dir: Path, max_batch_size: int, max_total_len: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Build a peer adapter by name, in our contenders' dtype and on their device; raises
    PeerUnavailable with the reason."""
    if name == "transformers":
        return TransformersStatic(model_dir, max_batch_size, dtype, device)
    if name == "transformers-cb":
        return TransformersContinuous(model_dir, max_batch_size, max_total_len, dtype, device)
    raise PeerUnavailable(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
