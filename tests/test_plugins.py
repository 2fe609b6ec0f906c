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
def outside_dist(install_plugin) -> Path:
    site = install_plugin("outside-sched", {"outside": "outside_sched:OutsideScheduler",
                                            "broken": "outside_broken:Nope"},
                          "outside_sched", GOOD)
    (site / "outside_broken.py").write_text("raise ImportError('missing dependency foo')\n")
    return site


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
    with pytest.raises(PluginError, match=r"scheduler 'outside' \(outside-sched 1.0\): bad "
                                          "scheduler_options"):
        instantiate_scheduler("outside", {"nope": 1})


def test_hookimpl_with_wrong_signature_is_rejected() -> None:
    from runtime import hookimpl

    class Bad:
        @hookimpl
        def admit_requests(self, waiting, running, budget, not_an_argument):
            return None

    expected = r"(?s)scheduler 'bad' \(class tests.test_plugins.Bad\) has an invalid hook.*not_an_arg"
    with pytest.raises(PluginError, match=expected):
        make_plugin_manager(Bad(), "bad")


def test_misspelled_hook_is_rejected() -> None:
    from runtime import hookimpl

    class Typo:
        @hookimpl
        def admit_request(self, waiting):
            return None

    with pytest.raises(PluginError, match="(?s)scheduler .typo.*admit_request"):
        make_plugin_manager(Typo(), "typo")


def test_import_error_keeps_the_original_traceback(outside_dist: Path) -> None:
    import traceback

    with pytest.raises(PluginError) as err:
        instantiate_scheduler("broken", None)
    text = "".join(traceback.format_exception(err.value))
    assert "outside_broken.py" in text and "raise ImportError('missing dependency foo')" in text


def test_unknown_scheduler_on_the_command_line_exits_non_zero(capsys) -> None:
    from runtime.cli import main

    assert main(["generate", "--scheduler", "sfj", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unknown scheduler 'sfj'. Did you mean 'sjf'?" in err
    assert "Installed schedulers:" in err and "static" in err and "sjf" in err


def test_schedulers_command_lists_package_version_and_hooks(outside_dist: Path, capsys) -> None:
    from runtime.cli import main

    assert main(["schedulers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PACKAGE", "VERSION", "OBJECT", "HOOKS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["outside"].split() == ["outside", "outside-sched", "1.0",
                                       "outside_sched:OutsideScheduler", "admit_requests"]
    assert rows["static"].split()[:3] == ["static", "baton-runtime", "0.1.0"]
    assert "admit_requests, make_kv_cache" in rows["static"]
    assert "failed to import: ImportError: missing dependency foo" in rows["broken"]


def test_schedulers_command_json_shows_the_installed_template() -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "runtime.cli", "schedulers", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["sjf"] == {"name": "sjf", "package": "baton-scheduler-template",
                           "version": "0.1.0", "object": "sjf_scheduler:ShortestPromptFirst",
                           "hooks": ["admit_requests"]}


def test_trace_hooks_prints_each_call_and_result_on_stderr(monkeypatch, capsys) -> None:
    from runtime.engine import Engine
    from runtime.sampling_params import SamplingParams
    from runtime.testing import tiny_model

    monkeypatch.setenv("RUNTIME_TRACE_HOOKS", "1")
    scheduler = instantiate_scheduler("sjf", {"max_wait_steps": 4})
    engine = Engine(tiny_model(seed=1), scheduler=scheduler, scheduler_name="sjf")
    req = engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert "[hook] make_kv_cache(shape=ModelShape(num_layers=2" in err[0]
    assert err[0].endswith("impls=[runtime-defaults]")
    assert err[1] == "[hook] make_kv_cache -> <PerRequestKVCache>"
    admit = next(i for i, line in enumerate(err) if line.startswith("[hook] admit_requests("))
    assert f"waiting=[{req.request_id}], running=[]" in err[admit]
    assert err[admit].endswith("impls=[sjf, runtime-defaults]")
    assert err[admit + 1] == \
        f"[hook] admit_requests -> AdmissionDecision(admit=[{req.request_id}], preempt=[])"
    assert f"[hook] on_request_finished(request={req.request_id}) impls=[]" in err


def test_no_trace_without_the_variable(monkeypatch, capsys) -> None:
    from runtime.engine import Engine
    from runtime.sampling_params import SamplingParams
    from runtime.testing import tiny_model

    monkeypatch.delenv("RUNTIME_TRACE_HOOKS", raising=False)
    Engine(tiny_model(seed=1)).generate([[1, 2]], SamplingParams(max_tokens=2))
    assert "[hook]" not in capsys.readouterr().err


def test_tutorial_quotes_the_template_as_it_is() -> None:
    root = Path(__file__).parent.parent
    tutorial = (root / "docs" / "writing-a-scheduler.md").read_text()
    conformance = (root / "plugins/template/tests/test_sjf_conformance.py").read_text()
    snippet = conformance[conformance.index("from runtime.conformance"):].strip()
    assert snippet in tutorial, "docs/writing-a-scheduler.md quotes an outdated template test"
    pyproject = (root / "plugins/template/pyproject.toml").read_text()
    assert 'sjf = "sjf_scheduler:ShortestPromptFirst"' in pyproject
    assert 'sjf = "sjf_scheduler:ShortestPromptFirst"' in tutorial


def test_template_selected_by_yaml_serves_a_model_folder(tmp_path: Path, capsys) -> None:
    """`scheduler: sjf` in a YAML file, through `runtime generate`: the same greedy tokens."""
    import json

    import torch

    from runtime.cli import main
    from tests.model_factory import make_hf_model_dir
    from tests.tokenizer_factory import make_tokenizer_dir

    model_dir = make_hf_model_dir(tmp_path / "m", "llama", dtype=torch.float64, seed=5)
    make_tokenizer_dir(model_dir, vocab_size=300)
    common = f"model: {model_dir}\ndtype: float64\nmax_num_seqs: 2\n"
    (tmp_path / "sjf.yaml").write_text(common + "scheduler: sjf\nscheduler_options:\n"
                                       "  max_wait_steps: 1\n")
    (tmp_path / "static.yaml").write_text(common + "scheduler: static\n")
    args = ["--max-tokens", "5", "--ignore-eos", "--json"]
    for prompt in ("In the beginning was the word", "a b", "c d e"):
        args += ["--prompt", prompt]
    runs = {}
    for name in ("sjf", "static"):
        assert main(["generate", "--config", str(tmp_path / f"{name}.yaml"), *args]) == 0
        runs[name] = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    assert runs["sjf"] == runs["static"] and all(len(t) == 5 for t in runs["sjf"])
