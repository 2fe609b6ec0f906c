"""Config precedence and errors that name the file, the key and the nearest valid key."""

from pathlib import Path

import pytest

from runtime.config import ConfigError, RuntimeConfig, build_config, check_static_decode_rows


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_when_nothing_given() -> None:
    assert build_config() == RuntimeConfig()


def test_yaml_over_defaults_and_cli_over_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "scheduler: orca\nmax-num-seqs: 4\nscheduler_options:\n  x: 1\n")
    cfg = build_config(path, {"max_num_seqs": 8, "dtype": None})
    assert cfg.scheduler == "orca"
    assert cfg.max_num_seqs == 8  # command line wins
    assert cfg.dtype == "auto"  # None means "not given on the command line"
    assert cfg.scheduler_options == {"x": 1}


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "max_num_seq: 4\n")
    with pytest.raises(ConfigError) as err:
        build_config(path)
    msg = str(err.value)
    assert str(path) in msg and "'max_num_seq'" in msg and "did you mean 'max_num_seqs'" in msg


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, "max_num_seqs: lots\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: key 'max_num_seqs' expects int"):
        build_config(path)


def test_bad_value_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "dtype: float8\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: dtype: expected one of"):
        build_config(path)
    path = write(tmp_path, "max_num_seqs: 0\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: max_num_seqs: must be >= 1"):
        build_config(path)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        build_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config(write(tmp_path, "- 1\n- 2\n"))


def test_unknown_cli_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="command line: unknown key 'schedular'.*'scheduler'"):
        build_config(None, {"schedular": "baton"})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_request_body_bytes: 0", "max_request_body_bytes: must be >= 1"),
        ("max-stop-strings: -1", "max_stop_strings: must be >= 1"),
        ("limit_concurrency: 0", "limit_concurrency: must be >= 1"),
        ("header_timeout: 0", "header_timeout: must be > 0 seconds"),
        ("body-timeout: -2.5", "body_timeout: must be > 0 seconds"),
        ("shutdown_timeout: -1", "shutdown_timeout: must be >= 0 seconds"),
        ("api_key: '  '", "api_key: must not be empty"),
        ("keep_alive_timeout: soon", "key 'keep_alive_timeout' expects float"),
        ("api_key_all_routes: 3", "key 'api_key_all_routes' expects bool"),
    ],
)
def test_server_limits_bad_values_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(write(tmp_path, line + "\n"))


def test_server_limits_precedence_and_api_key_sources(tmp_path: Path, monkeypatch) -> None:
    """CLI over YAML over defaults; the key falls back to $RUNTIME_API_KEY and is never logged."""
    from runtime.server.state import API_KEY_ENV, ServerSettings

    path = write(tmp_path, "max_prompt_chars: 500\nheader-timeout: 3\napi_key: from-yaml\n")
    cfg = build_config(path, {"max_prompt_chars": 900, "body_timeout": None})
    assert (cfg.max_prompt_chars, cfg.header_timeout, cfg.body_timeout) == (900, 3.0, 60.0)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServerSettings.from_config(cfg).api_key == "from-yaml"
    assert ServerSettings.from_config(RuntimeConfig()).api_key == "from-env"
    assert cfg.redacted()["api_key"] == "***" and "from-yaml" not in str(cfg.redacted())
    settings = ServerSettings.from_config(cfg)
    assert (settings.max_prompt_chars, settings.header_timeout) == (900, 3.0)


def test_static_decode_rows_rule_is_shared_and_names_the_key() -> None:
    """One rule for the YAML key and both CLIs' flags: sorted and unique, or an error that
    names whichever key the user wrote."""
    assert check_static_decode_rows([8, 2, 2, 1], compiled=True) == (1, 2, 8)
    assert check_static_decode_rows((), compiled=False) == ()
    for bad in (4, [0, 2], [True], "1 2", [1.5]):
        with pytest.raises(ConfigError, match="--static-decode-rows: expected a list"):
            check_static_decode_rows(bad, True, "--static-decode-rows", "--compile")
    with pytest.raises(ConfigError, match="--static-decode-rows: needs --compile"):
        check_static_decode_rows([2], False, "--static-decode-rows", "--compile")
    with pytest.raises(ConfigError, match="static_decode_rows: needs compile"):
        RuntimeConfig(static_decode_rows=(2,))
