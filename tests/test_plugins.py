"""Scheduler discovery by entry point, selection by YAML name, and load errors."""

from pathlib import Path

import pytest

from runtime.config import build_config
from runtime.plugins import (
    PluginError,
    installed_schedulers,
    instantiate_scheduler,
    make_plugin_manager,
)
from tests.plugin_dist import install_fake_dist, uninstall_fake_dist

GOOD = """
from runtime import hookimpl
from runtime.scheduling import AdmissionDecision

class OutsideScheduler:
    def __init__(self, quota=1):
        self.quota = quota

    @hookimpl
    def admit_requests(self, waiting, running, budget):
        return AdmissionDecision(admit=tuple(waiting[: self.quota]))
"""


@pytest.fixture
def outside_dist(tmp_path: Path):
    site = tmp_path / "site"
    install_fake_dist(site, "outside-sched", {"outside": "outside_sched:OutsideScheduler",
                                              "broken": "outside_broken:Nope"},
                      "outside_sched", GOOD)
    (site / "outside_broken.py").write_text("raise ImportError('missing dependency foo')\n")
    yield site
    uninstall_fake_dist(site, "outside_sched")


def test_static_is_registered_like_a_third_party() -> None:
    names = {info.name: info for info in installed_schedulers()}
    assert names["static"].distribution == "baton-runtime"
    assert names["static"].value == "static_plugin:StaticScheduler"


def test_outside_scheduler_selected_by_yaml_name(outside_dist: Path, tmp_path: Path) -> None:
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("scheduler: outside\nscheduler_options:\n  quota: 3\n")
    cfg = build_config(cfg_path)
    scheduler = instantiate_scheduler(cfg.scheduler, cfg.scheduler_options)
    assert type(scheduler).__name__ == "OutsideScheduler" and scheduler.quota == 3
    pm = make_plugin_manager(scheduler, "outside")
    assert pm.get_plugin("outside") is scheduler


def test_unknown_name_lists_installed_and_suggests(outside_dist: Path) -> None:
    with pytest.raises(PluginError) as err:
        instantiate_scheduler("outsid", None)
    msg = str(err.value)
    assert "unknown scheduler 'outsid'" in msg and "Did you mean 'outside'" in msg
    assert "static" in msg


def test_import_error_names_entry_point_and_distribution(outside_dist: Path) -> None:
    with pytest.raises(PluginError) as err:
        instantiate_scheduler("broken", None)
    msg = str(err.value)
    assert "'broken'" in msg and "outside-sched 1.0" in msg and "missing dependency foo" in msg
    assert isinstance(err.value.__cause__, ImportError)  # original traceback kept


def test_bad_options_name_scheduler(outside_dist: Path) -> None:
    with pytest.raises(PluginError, match="scheduler 'outside': bad scheduler_options"):
        instantiate_scheduler("outside", {"nope": 1})


def test_hookimpl_with_wrong_signature_is_rejected() -> None:
    from runtime import hookimpl

    class Bad:
        @hookimpl
        def admit_requests(self, waiting, running, budget, not_an_argument):
            return None

    with pytest.raises(PluginError, match="(?s)scheduler .bad. has an invalid hook.*not_an_argument"):
        make_plugin_manager(Bad(), "bad")


def test_misspelled_hook_is_rejected() -> None:
    from runtime import hookimpl

    class Typo:
        @hookimpl
        def admit_request(self, waiting):
            return None

    with pytest.raises(PluginError, match="(?s)scheduler .typo.*admit_request"):
        make_plugin_manager(Typo(), "typo")
