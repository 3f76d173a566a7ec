"""The shipped deployment configs parse and validate with the daemon's own loader."""

from pathlib import Path

import pytest
import yaml

from daemon.config import load_config
from daemon.errors import ConfigError
from streamrnn.scoring import ScoringConfig

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _check(text: str, tmp_path: Path, model: Path) -> None:
    cfg_path = tmp_path / "daemon.toml"
    cfg_path.write_text(text)
    cfg = load_config(cfg_path, env={}, overrides={"model": str(model), "state_dir": str(tmp_path)})
    assert cfg.input and cfg.alerts and cfg.group
    ScoringConfig.from_dict(cfg.scoring).validate()


def test_sample_toml_is_valid(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    _check((DEPLOY / "daemon.toml").read_text(), tmp_path, model)


def test_kubernetes_configmap_is_valid(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    _check(cm["data"]["daemon.toml"], tmp_path, model)


def test_a_typo_in_the_sample_is_caught(tmp_path):
    text = (DEPLOY / "daemon.toml").read_text().replace("batch_max_events", "batch_max_event")
    with pytest.raises(ConfigError, match="batch_max_events"):
        _check(text, tmp_path, tmp_path / "m")


def test_compose_creates_the_input_topic_before_the_daemons_start():
    # The daemon stops at start when its input topic is missing ("input topic(s) [...] do not
    # exist"); in the compose file nothing created it, so `docker compose up` left two exited
    # daemons. A one-shot service creates every input topic of daemon.toml first.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    daemon = services["streamrnn"]
    waits_for = {name for name, cond in daemon["depends_on"].items()
                 if cond == {"condition": "service_completed_successfully"}}
    assert len(waits_for) == 1
    creator = services[waits_for.pop()]
    script = " ".join(creator["command"]) if isinstance(creator["command"], list) else creator["command"]
    cfg = load_config(DEPLOY / "daemon.toml", env={}, validate=False)
    bootstrap = cfg.bootstrap.split(",")[0]
    for topic in cfg.input:
        assert "kafka-topics.sh" in script and "--create" in script and "--if-not-exists" in script
        assert f"--topic {topic} " in script and f"--bootstrap-server {bootstrap}" in script
    assert daemon["restart"] == "on-failure"  # a daemon that stops on an error comes back


def test_systemd_unit_keeps_restarting_a_daemon_that_stops_at_start():
    # systemd gives up on a unit that fails StartLimitBurst=5 times within
    # StartLimitIntervalSec=10 s; with the default RestartSec of 100 ms a daemon waiting for
    # its input topic was given up on within a second.
    import configparser

    unit = configparser.ConfigParser(strict=False)
    unit.optionxform = str
    unit.read_string((DEPLOY / "streamrnn-daemon.service").read_text())
    service = unit["Service"]
    assert service["Restart"] in ("on-failure", "always")
    burst = int(unit["Unit"].get("StartLimitBurst", 5))
    interval_s = float(unit["Unit"].get("StartLimitIntervalSec", 10))
    assert float(service.get("RestartSec", 0.1)) * burst > interval_s
