"""KV memory per replica: a fraction is shared among replicas that one machine starts together."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from runtime.config import RuntimeConfig  # noqa: E402
from runtime.distributed.cluster import replica_kv_memory  # noqa: E402


@pytest.mark.parametrize(
    ("memory", "replicas", "local", "expected"),
    [
        ("auto", 2, True, 0.2),  # auto is 0.4 of available memory, split in two
        ("0.6", 3, True, 0.2),
        (0.5, 4, True, 0.125),
        ("auto", 2, False, "auto"),  # a cluster: Ray places the actors, each node sizes its own
        ("4GiB", 2, True, "4GiB"),  # a size is per replica as written
        ("auto", 1, True, "auto"),
    ],
)
def test_fraction_is_split_among_local_replicas(memory, replicas, local, expected) -> None:
    config = RuntimeConfig(replicas=replicas, kv_cache_memory=memory)
    got = replica_kv_memory(config, local)
    assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected
