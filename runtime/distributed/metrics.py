"""/metrics with replicas: each replica's own series under a `replica` label, plus the front's.

Every replica keeps the single-process `ServerMetrics` (same names, buckets and meanings,
observed on its engine thread from its requests' timestamps) with `replica="i"` added. The
front fetches their exposition at each scrape and serves the families merged, so one scrape
shows every replica; sum over the label for the whole server
(`sum without (replica) (rate(runtime:generation_tokens_total[1m]))`). A replica that is down
is absent until it is back; its counters restart from zero then, as after any restart.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


class ReplicaFamilies:
    """A collector yielding the replicas' families, merged by name (from their last texts)."""

    def __init__(self, own: set[str]) -> None:
        self.own = own  # families the front defines itself, such as the rejected counter
        self.texts: dict[int, str] = {}

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for _, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                if family.name in self.own:
                    continue
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        yield from families.values()


class FrontMetrics:
    """The front's registry: rejections, replica and worker health, retries; the replicas'."""

    def __init__(self, model_name: str, scheduler: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "scheduler": scheduler}
        names = list(self.labels)
        self.rejected = Counter(
            "runtime:num_requests_rejected",
            "Requests rejected because the waiting queue was full.", names,
            registry=self.registry).labels(**self.labels)
        self.retried = Counter(
            "runtime:num_requests_retried", "Requests sent again to another replica after "
            "theirs failed before any output.", names, registry=self.registry
        ).labels(**self.labels)
        self._up = Gauge("runtime:replica_up", "1 while the replica answers, 0 while it is "
                         "down or restarting.", [*names, "replica"], registry=self.registry)
        self._restarts = Counter("runtime:replica_restarts", "Times the replica came back "
                                 "after a failure.", [*names, "replica"], registry=self.registry)
        self._worker_up = Gauge("runtime:prefill_worker_up", "1 while the prefill worker "
                                "answers, else 0.", [*names, "worker"], registry=self.registry)
        own = {"runtime:num_requests_rejected", "runtime:num_requests_retried",
               "runtime:replica_up", "runtime:replica_restarts", "runtime:prefill_worker_up"}
        self.replicas = ReplicaFamilies(own)
        self.registry.register(self.replicas)

    def replica_up(self, index: int, up: bool) -> None:
        self._up.labels(**self.labels, replica=str(index)).set(1 if up else 0)

    def replica_restarted(self, index: int) -> None:
        self._restarts.labels(**self.labels, replica=str(index)).inc()

    def worker_up(self, index: int, up: bool) -> None:
        self._worker_up.labels(**self.labels, worker=str(index)).set(1 if up else 0)
