"""Daemon settings: a TOML file, overridden by ``STREAMRNN_<NAME>`` environment variables,
overridden by command-line flags; validated once at start with messages that say what to fix.

The TOML file groups settings in sections (``[kafka]``, ``[daemon]``, ``[format]``) whose
keys are the field names of :class:`DaemonConfig`; a ``[scoring]`` section goes to
:meth:`streamrnn.scoring.ScoringConfig.from_dict`, a ``[detector]`` section holds
``max_streams`` and ``idle_timeout_ms``. Example::

    [kafka]
    bootstrap = "127.0.0.1:9092"
    input = ["events"]
    alerts = "alerts"
    group = "streamrnn"

    [daemon]
    model = "model.safetensors"
    state_dir = "/var/lib/streamrnn"
    state_store = "changelog"

Environment variables use the upper-case field name: ``STREAMRNN_BOOTSTRAP``,
``STREAMRNN_SASL_PLAIN_PASSWORD``, ``STREAMRNN_CHECKPOINT_INTERVAL_MS``; lists are
comma-separated.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError

__all__ = ["DaemonConfig", "load_config", "SECRET_FIELDS", "ENV_PREFIX"]

ENV_PREFIX = "STREAMRNN_"
#: Settings never written to logs.
SECRET_FIELDS = frozenset({"sasl_plain_password", "ssl_password", "sasl_oauth_token"})
_SECTIONS = {"kafka", "daemon", "format"}


@dataclass
class DaemonConfig:
    """Every daemon setting (see the module docstring for where they come from)."""

    # ---- kafka: topics and group
    bootstrap: str = ""
    input: list[str] = field(default_factory=list)
    alerts: str = ""
    scores: str = ""  # optional: every scored event
    dead_letter: str = ""  # default "<first input>.dead-letter"
    group: str = ""
    create_topics: bool = True  # create missing output topics
    topic_partitions: int = 0  # partitions of created output topics (0: as many as the inputs)
    replication_factor: int = 1  # of created topics
    auto_offset_reset: str = "earliest"
    # ---- kafka: client tuning (defaults tuned for low latency on a small broker)
    fetch_min_bytes: int = 1
    # Apache Kafka answers a waiting fetch as soon as fetch_min_bytes are there; the development
    # broker (Tansu) only looks again after about half of this wait: latency per consumer hop.
    # Swept 2/5/10/20 ms (bench_daemon, load 6-9): idle reader 28/19/13/8% of a core (+ broker
    # 8/6/5/4%); no setting below 20 shortened a hop (relay first hop p50 98-133 ms at 2-10
    # vs 47-81 at 20: the extra polling costs more than it saves on a busy 2-core host).
    fetch_max_wait_ms: int = 20
    max_partition_fetch_bytes: int = 4 << 20
    max_poll_records: int = 5000
    linger_ms: int = 1
    batch_size: int = 256 << 10
    acks: str = "all"
    # Client of the output producer (alerts, scores, dead letters, changelog rows):
    # "confluent-kafka" (librdkafka: network I/O on native threads, off the GIL) or
    # "kafka-python". bench_daemon, 4 interleaved runs at load 8-10: daemon p99 produce-to-alert
    # 453-538 ms vs 860-1834 with kafka-python (median gap to raw p99 +227 vs +415 ms; first
    # hop minus the raw relay's, median 34 vs 164 ms); backlog rate the same.
    producer_client: str = "confluent-kafka"
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 1000
    max_poll_interval_ms: int = 30000
    request_timeout_ms: int = 30000
    # ---- kafka: security, passed through to the clients
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_plain_username: str = ""
    sasl_plain_password: str = ""
    sasl_oauth_token: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_password: str = ""
    ssl_check_hostname: bool = True
    # ---- daemon
    model: str = ""
    state_dir: str = ""
    state_store: str = "local"  # "local" | "changelog"
    changelog_topic: str = ""  # default "<group>-state-changelog"
    checkpoint_interval_ms: int = 1000
    checkpoint_events: int = 200_000
    batch_max_events: int = 20_000
    batch_max_wait_ms: int = 100  # poll timeout: returns as soon as records arrive
    max_pending_messages: int = 50_000  # backpressure: pause input while more are unacknowledged
    grace_period_s: float = 20.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no metrics server; -1: any free port
    model_reload_interval_s: float = 2.0  # 0: no hot reload
    # Numba threads for scoring (0: all cores). One keeps the other cores for the Kafka
    # client's threads; scale out with more daemons and partitions.
    numba_threads: int = 1
    # CPython's GIL switch interval while the daemon runs (sys.setswitchinterval; restored on
    # exit). The loop hands fetch requests to kafka-python's I/O thread without waiting; that
    # thread then waits for the GIL the scoring loop holds, by default up to 5 ms. bench_daemon,
    # 9 interleaved fixed-rate runs each (load 1-4): daemon p99 minus the raw two-hop relay's,
    # median +50 ms at 5 ms, +25 ms at 0.5 ms.
    switch_interval_ms: float = 0.5
    log_level: str = "INFO"
    # ---- format of input events
    stream_field: str = "stream"
    ts_field: str = "ts"
    value_field: str = "value"
    values_field: str = "values"
    # ---- sections handed on
    scoring: dict = field(default_factory=dict)
    detector: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def dead_letter_topic(self) -> str:
        if self.dead_letter or not self.input:
            return self.dead_letter
        return f"{self.input[0]}.dead-letter"

    @property
    def changelog(self) -> str:
        return self.changelog_topic or f"{self.group}-state-changelog"

    def redacted(self) -> dict[str, Any]:
        """The settings with secrets masked, for logs."""
        d = dataclasses.asdict(self)
        for k in SECRET_FIELDS:
            if d.get(k):
                d[k] = "***"
        return d

    def kafka_common(self) -> dict[str, Any]:
        """Connection and security options shared by every kafka-python client."""
        opts: dict[str, Any] = {"bootstrap_servers": self.bootstrap.split(","),
                                "security_protocol": self.security_protocol,
                                "request_timeout_ms": self.request_timeout_ms}
        for name in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password", "sasl_oauth_token",
                     "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password"):
            if getattr(self, name):
                opts[name] = getattr(self, name)
        if self.security_protocol in ("SSL", "SASL_SSL"):
            opts["ssl_check_hostname"] = self.ssl_check_hostname
        return opts

    # ------------------------------------------------------------------ validation
    def validate(self) -> "DaemonConfig":
        """Raise :class:`ConfigError` naming every problem at once."""
        problems = []
        for name in ("bootstrap", "alerts", "group", "model", "state_dir"):
            if not getattr(self, name):
                problems.append(f"{name} is required (flag --{name.replace('_', '-')}, "
                                f"env {ENV_PREFIX}{name.upper()} or TOML)")
        if not self.input or not all(self.input):
            problems.append("input is required: one or more topic names (--input T1,T2)")
        for hp in self.bootstrap.split(",") if self.bootstrap else []:
            host, _, port = hp.rpartition(":")
            if not host or not port.isdigit():
                problems.append(f"bootstrap {hp!r} must be HOST:PORT")
        if self.state_store not in ("local", "changelog"):
            problems.append(f"state_store must be 'local' or 'changelog', got {self.state_store!r}")
        if self.auto_offset_reset not in ("earliest", "latest"):
            problems.append(f"auto_offset_reset must be 'earliest' or 'latest', got {self.auto_offset_reset!r}")
        if self.producer_client not in ("kafka-python", "confluent-kafka"):
            problems.append(f"producer_client must be 'kafka-python' or 'confluent-kafka', got {self.producer_client!r}")
        if self.acks not in ("all", "0", "1"):
            problems.append(f"acks must be 'all', '0' or '1', got {self.acks!r}")
        positive = ("checkpoint_interval_ms", "checkpoint_events", "batch_max_events", "max_poll_records",
                    "max_pending_messages", "session_timeout_ms", "replication_factor", "heartbeat_interval_ms",
                    "max_poll_interval_ms", "request_timeout_ms", "fetch_min_bytes", "max_partition_fetch_bytes",
                    "batch_size", "switch_interval_ms")
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("batch_max_wait_ms", "fetch_max_wait_ms", "linger_ms", "topic_partitions", "numba_threads",
                     "grace_period_s", "model_reload_interval_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not -1 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port must be -1 (any), 0 (off) or a port, got {self.metrics_port}")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            problems.append("heartbeat_interval_ms must be below session_timeout_ms")
        if self.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            problems.append(f"security_protocol {self.security_protocol!r} is not one of PLAINTEXT, SSL, "
                            "SASL_PLAINTEXT, SASL_SSL")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.model and not Path(self.model).is_file():
            problems.append(f"model file {self.model!r} does not exist")
        if self.state_dir and Path(self.state_dir).exists() and not Path(self.state_dir).is_dir():
            problems.append(f"state_dir {self.state_dir!r} is a file, not a directory")
        outputs = {self.alerts, self.scores, self.dead_letter_topic} - {""}
        if self.input and outputs & set(self.input):
            problems.append(f"output topic(s) {sorted(outputs & set(self.input))} are also inputs")
        unknown = set(self.detector) - {"max_streams", "idle_timeout_ms"}
        if unknown:
            problems.append(f"[detector] has unknown key(s) {sorted(unknown)}; known: max_streams, idle_timeout_ms")
        if problems:
            raise ConfigError("invalid daemon configuration:\n  - " + "\n  - ".join(problems))
        self.log_level = self.log_level.upper()
        return self


_FIELDS = {f.name: f for f in fields(DaemonConfig)}
_PLAIN = {n for n in _FIELDS if n not in ("scoring", "detector")}
#: The environment variables :func:`load_config` reads.
ENV_NAMES = frozenset(ENV_PREFIX + n.upper() for n in _PLAIN)


def unknown_env_warnings(env: dict[str, str] | None = None) -> list[str]:
    """A line for each ``STREAMRNN_*`` variable of ``env`` (default ``os.environ``) that
    neither the daemon nor the library reads."""
    from streamrnn.environment import unknown_env_messages

    return unknown_env_messages(os.environ if env is None else env, ENV_NAMES)


def _coerce(name: str, value: Any, source: str) -> Any:
    """``value`` as the type of setting ``name``; strings (env, flags) are parsed."""
    kind = type(getattr(DaemonConfig(), name))
    try:
        if kind is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
            raise TypeError
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise TypeError
        if kind is int:
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError
        return str(value)
    except (TypeError, ValueError):
        shown = "***" if name in SECRET_FIELDS else repr(value)
        raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {shown}") from None


def _unknown(name: str, source: str) -> ConfigError:
    """Names the setting and the way out: the nearest names, the section it belongs to, or all."""
    from streamrnn.scoring import ScoringConfig

    near = difflib.get_close_matches(name, sorted(_PLAIN), n=3)
    if name in {f.name for f in fields(ScoringConfig)}:
        hint = f"; {name!r} is a scoring setting: put it under [scoring] in the --config TOML file"
    elif near:
        hint = f"; did you mean {' or '.join(map(repr, near))}?"
    else:
        hint = f"; the settings are {', '.join(sorted(_PLAIN))}"
    return ConfigError(f"{source}: unknown setting {name!r}{hint}")


def check_setting_name(name: str, source: str) -> None:
    """Raise :class:`ConfigError` (naming ``source``) unless ``name`` is a plain setting."""
    if name not in _PLAIN:
        raise _unknown(name, source)


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, val in data.items():
        if key in ("scoring", "detector"):
            if not isinstance(val, dict):
                raise ConfigError(f"{path}: [{key}] must be a table")
            out[key] = val
        elif key in _SECTIONS and isinstance(val, dict):
            for k, v in val.items():
                if k not in _PLAIN:
                    raise _unknown(k, f"{path} [{key}]")
                out[k] = _coerce(k, v, f"{path} [{key}]")
        elif key in _PLAIN:
            out[key] = _coerce(key, val, str(path))
        else:
            raise _unknown(key, str(path))
    return out


def load_config(path: str | Path | None = None, *, env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None, validate: bool = True) -> DaemonConfig:
    """Settings from the TOML file at ``path``, then ``STREAMRNN_*`` variables of ``env``
    (default ``os.environ``), then ``overrides`` (flags; None values are ignored)."""
    values: dict[str, Any] = _from_toml(Path(path)) if path else {}
    env = os.environ if env is None else env
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name in _PLAIN:
            values[name] = _coerce(name, raw, f"environment {key}")
    for name, val in (overrides or {}).items():
        if val is None:
            continue
        if name not in _PLAIN:
            raise _unknown(name, "flag")
        values[name] = _coerce(name, val, f"flag --{name.replace('_', '-')}")
    cfg = DaemonConfig(**values)
    return cfg.validate() if validate else cfg
