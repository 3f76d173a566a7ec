"""Daemon settings: TOML < environment < flags, validation messages, secrets, CLI wrappers."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from daemon.config import load_config
from daemon.errors import ConfigError
from streamrnn.cli import app


@pytest.fixture
def model_file(tmp_path):
    from streamrnn.model import Model

    return Model.random("gru", 1, [4], seed=0).save(tmp_path / "m.safetensors")


def _toml(tmp_path, model_file, extra=""):
    p = tmp_path / "daemon.toml"
    p.write_text(f'''
[kafka]
bootstrap = "127.0.0.1:9092"
input = ["events"]
alerts = "alerts"
group = "g1"
sasl_plain_password = "hunter2"

[daemon]
model = "{model_file}"
state_dir = "{tmp_path / 'state'}"
checkpoint_interval_ms = 500

[scoring]
warmup = 3
{extra}''')
    return p


def test_environment_overrides_toml_and_flags_override_environment(tmp_path, model_file):
    path = _toml(tmp_path, model_file)
    env = {"STREAMRNN_GROUP": "from-env", "STREAMRNN_CHECKPOINT_INTERVAL_MS": "700", "STREAMRNN_INPUT": "a,b"}
    cfg = load_config(path, env=env, overrides={"group": "from-flag"})
    assert cfg.group == "from-flag"
    assert cfg.checkpoint_interval_ms == 700 and cfg.input == ["a", "b"]
    assert cfg.alerts == "alerts" and cfg.scoring == {"warmup": 3}
    assert cfg.dead_letter_topic == "a.dead-letter"


def test_secrets_are_redacted_and_passed_to_clients(tmp_path, model_file):
    cfg = load_config(_toml(tmp_path, model_file), env={})
    assert "hunter2" not in repr(cfg.redacted())
    assert cfg.kafka_common()["sasl_plain_password"] == "hunter2"


def test_secrets_reach_the_confluent_producer_by_librdkafka_names(tmp_path, model_file):
    from daemon.output import confluent_settings

    cfg = load_config(_toml(tmp_path, model_file), env={}, overrides={"producer_client": "confluent-kafka",
                                                                     "sasl_plain_username": "alice"})
    opts = confluent_settings(cfg)
    assert opts["sasl.password"] == "hunter2" and opts["sasl.username"] == "alice"
    assert opts["bootstrap.servers"] == cfg.bootstrap and opts["enable.idempotence"] is True
    assert opts["partitioner"] == "murmur2_random"  # the Java client's and kafka-python's


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides={"bootstrap": "nohost", "state_store": "s3", "batch_max_events": 0,
                                       "producer_client": "librdkafka", "switch_interval_ms": 0})
    msg = str(err.value)
    for part in ("alerts is required", "model is required", "must be HOST:PORT", "state_store must be",
                 "batch_max_events must be > 0", "input is required", "switch_interval_ms must be > 0",
                 "producer_client must be 'kafka-python' or 'confluent-kafka', got 'librdkafka'"):
        assert part in msg


def test_unknown_setting_suggests_the_nearest(tmp_path, model_file):
    with pytest.raises(ConfigError, match="flag: unknown setting 'checkpoint_intervl_ms'; did you mean "
                                          "'checkpoint_interval_ms'"):
        load_config(_toml(tmp_path, model_file), env={}, overrides={"checkpoint_intervl_ms": 5})
    with pytest.raises(ConfigError, match="unknown setting 'daemon2'"):
        load_config(_toml(tmp_path, model_file, "[daemon2]\nx = 1\n"), env={})


def test_wrong_type_in_environment_names_the_variable(tmp_path, model_file):
    with pytest.raises(ConfigError, match="STREAMRNN_LINGER_MS: linger_ms must be int"):
        load_config(_toml(tmp_path, model_file), env={"STREAMRNN_LINGER_MS": "soon"})


def test_bad_toml_and_missing_model_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="model file .* does not exist"):
        load_config(env={}, overrides=dict(bootstrap="h:1", input="i", alerts="a", group="g", state_dir=str(tmp_path),
                                           model=str(tmp_path / "missing.safetensors")))


def test_cli_daemon_reports_config_errors_without_traceback(tmp_path):
    res = CliRunner().invoke(app, ["daemon", "--bootstrap", "x", "--input", "in", "--set", "linger_ms=-1"])
    assert res.exit_code == 2
    assert "must be HOST:PORT" in res.output and "linger_ms must be >= 0" in res.output
    assert "Traceback" not in res.output


def test_cli_daemon_reports_unreachable_input_topic(tmp_path, model_file, kafka_broker):
    res = CliRunner().invoke(app, ["daemon", "--bootstrap", kafka_broker.bootstrap, "--input", "no-such-topic",
                                   "--alerts", "a", "--model", str(model_file), "--group", "g",
                                   "--state-dir", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert "do not exist" in res.output and "--to-kafka" in res.output


def test_unknown_streamrnn_variables_are_named_with_their_close_matches():
    # A misspelt variable was ignored without a word and its setting kept the default.
    from daemon.config import unknown_env_warnings

    env = {"STREAMRNN_LINGERMS": "3", "STREAMRNN_FASTMAHT": "0", "STREAMRNN_GROUP": "g", "STREAMRNN_PANEL": "16",
           "STREAMRNN_ZZZ": "1", "PATH": "/bin", "STREAMRNNX": "1"}
    lines = unknown_env_warnings(env)
    assert len(lines) == 3
    assert lines[0].startswith("environment variable STREAMRNN_FASTMAHT is not a streamrnn setting and is ignored; "
                               "did you mean STREAMRNN_FASTMATH?")
    assert lines[1].endswith("STREAMRNN_LINGERMS is not a streamrnn setting and is ignored; "
                             "did you mean STREAMRNN_LINGER_MS?")
    assert "STREAMRNN_ZZZ" in lines[2] and "STREAMRNN_<daemon setting>" in lines[2]
    assert unknown_env_warnings({"STREAMRNN_SPLIT": "0", "STREAMRNN_BOOTSTRAP": "h:1"}) == []


def test_every_command_warns_of_an_unknown_streamrnn_variable(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "absent.safetensors")],
                                env={"STREAMRNN_BOOTSTRAPP": "127.0.0.1:9092"})
    assert result.exit_code == 2
    assert "warning: environment variable STREAMRNN_BOOTSTRAPP is not a streamrnn setting" in result.output
    assert "did you mean STREAMRNN_BOOTSTRAP?" in result.output
