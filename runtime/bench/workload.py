"""Seeded benchmark workloads described in YAML: arrivals, prompt and output length mixes.

Every scheduler and peer engine replays the same list of `BenchRequest`s, with outputs forced
to their target length (`ignore_eos` + `max_tokens`), so they all do the same useful work.

    name: orca-trace
    seed: 0
    num_requests: 32
    arrival: {poisson: 4.0}          # or: all-at-once
    classes:                         # or top-level prompt_len/output_len for one class
      - {weight: 1, prompt_len: [32, 512], output_len: [1, 128]}
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

WORKLOAD_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "workloads"
FIRST_TOKEN_ID = 16  # random prompt ids start here, away from the special tokens at the front


class WorkloadError(ValueError):
    """A workload file or name is invalid; the message names the file and key."""


@dataclass(frozen=True, slots=True)
class LengthRange:
    """Uniform integer lengths in [low, high] (both inclusive)."""

    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True, slots=True)
class RequestClass:
    """One kind of request in the mix (e.g. short chat vs long document)."""

    weight: float
    prompt_len: LengthRange
    output_len: LengthRange


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A workload: how many requests, when they arrive and how long they are."""

    name: str
    num_requests: int
    classes: tuple[RequestClass, ...]
    rate: float | None = None  # requests/s of Poisson arrivals; None = all at once
    seed: int = 0
    description: str = ""

    def with_overrides(
        self,
        num_requests: int | None = None,
        rate: float | None = None,
        all_at_once: bool = False,
        seed: int | None = None,
    ) -> WorkloadSpec:
        """A copy scaled for this run (command-line `--num-requests`, `--rate`, `--seed`)."""
        spec = self
        if num_requests is not None:
            spec = replace(spec, num_requests=num_requests)
        if rate is not None:
            spec = replace(spec, rate=rate)
        if all_at_once:
            spec = replace(spec, rate=None)
        if seed is not None:
            spec = replace(spec, seed=seed)
        return spec

    def max_total_len(self) -> int:
        """The longest prompt plus output any request of this workload can have."""
        return max(c.prompt_len.high + c.output_len.high for c in self.classes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_requests": self.num_requests,
            "seed": self.seed,
            "arrival": "all-at-once" if self.rate is None else {"poisson": self.rate},
            "classes": [
                {
                    "weight": c.weight,
                    "prompt_len": [c.prompt_len.low, c.prompt_len.high],
                    "output_len": [c.output_len.low, c.output_len.high],
                }
                for c in self.classes
            ],
        }


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request to replay: arrival offset (s) from the start, prompt ids, forced output length."""

    index: int
    arrival: float
    prompt_token_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


_KEYS = (
    "name",
    "seed",
    "num_requests",
    "arrival",
    "classes",
    "prompt_len",
    "output_len",
    "description",
)


def _range(value: Any, where: str) -> LengthRange:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise WorkloadError(f"{where}: expected [low, high] integers, got {value!r}")
    low, high = value
    if not 1 <= low <= high:
        raise WorkloadError(f"{where}: need 1 <= low <= high, got [{low}, {high}]")
    return LengthRange(low, high)


def _rate(value: Any, where: str) -> float | None:
    if value in (None, "all-at-once", "all_at_once", "burst"):
        return None
    if isinstance(value, dict) and set(value) == {"poisson"}:
        rate = value["poisson"]
        if isinstance(rate, int | float) and not isinstance(rate, bool) and rate > 0:
            return float(rate)
    raise WorkloadError(
        f"{where}: key 'arrival' expects all-at-once or {{poisson: RATE > 0}}, got {value!r}"
    )


def parse_workload(raw: dict[str, Any], where: str = "workload") -> WorkloadSpec:
    """Validate a YAML mapping into a spec; unknown keys are errors with a suggestion."""
    if not isinstance(raw, dict):
        raise WorkloadError(f"{where}: expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in _KEYS:
            near = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise WorkloadError(f"{where}: unknown key {key!r}{hint}")
    if "classes" in raw:
        if not isinstance(raw["classes"], list) or not raw["classes"]:
            raise WorkloadError(f"{where}: 'classes' must be a non-empty list")
        items = raw["classes"]
    else:
        items = [
            {"weight": 1, "prompt_len": raw.get("prompt_len"), "output_len": raw.get("output_len")}
        ]
    classes = []
    for i, item in enumerate(items):
        w = f"{where}: classes[{i}]"
        if not isinstance(item, dict):
            raise WorkloadError(f"{w}: expected a mapping")
        weight = item.get("weight", 1)
        if not isinstance(weight, int | float) or weight <= 0:
            raise WorkloadError(f"{w}: weight must be > 0, got {weight!r}")
        classes.append(
            RequestClass(
                float(weight),
                _range(item.get("prompt_len"), f"{w}.prompt_len"),
                _range(item.get("output_len"), f"{w}.output_len"),
            )
        )
    num = raw.get("num_requests")
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise WorkloadError(f"{where}: num_requests must be an integer >= 1, got {num!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise WorkloadError(f"{where}: seed must be an integer, got {seed!r}")
    return WorkloadSpec(
        str(raw.get("name") or Path(where).stem),
        num,
        tuple(classes),
        _rate(raw.get("arrival"), where),
        seed,
        str(raw.get("description", "")),
    )


def named_workloads() -> list[str]:
    """Names of the workloads shipped in benchmarks/workloads/."""
    return sorted(p.stem for p in WORKLOAD_DIR.glob("*.yaml"))


def load_workload(name_or_path: str | Path) -> WorkloadSpec:
    """A shipped workload by name (`orca-trace`) or any YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = WORKLOAD_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise WorkloadError(
                f"unknown workload {str(name_or_path)!r}: not a file, and not one "
                f"of the named workloads ({', '.join(named_workloads())})"
            )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise WorkloadError(f"{path}: invalid YAML: {exc}") from exc
    return parse_workload(raw, str(path))


def generate_requests(
    spec: WorkloadSpec, vocab_size: int, max_model_len: int | None = None
) -> list[BenchRequest]:
    """The seeded request list; the same spec and vocabulary always give the same list.

    Prompts longer than `max_model_len - output_len` are cut so every request fits the model.
    """
    if vocab_size <= FIRST_TOKEN_ID:
        raise WorkloadError(f"vocab_size must be > {FIRST_TOKEN_ID}, got {vocab_size}")
    rng = random.Random(spec.seed)
    weights = [c.weight for c in spec.classes]
    out, clock = [], 0.0
    for i in range(spec.num_requests):
        cls = rng.choices(spec.classes, weights)[0]
        prompt_len, output_len = cls.prompt_len.sample(rng), cls.output_len.sample(rng)
        if max_model_len is not None:
            output_len = min(output_len, max_model_len - 1)
            prompt_len = max(1, min(prompt_len, max_model_len - output_len))
        if spec.rate is not None and i > 0:
            clock += rng.expovariate(spec.rate)
        prompt = tuple(rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(prompt_len))
        out.append(BenchRequest(i, clock, prompt, output_len))
    return out
