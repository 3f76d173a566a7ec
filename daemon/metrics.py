"""Prometheus metrics, ``/healthz`` and ``/readyz`` on a small HTTP server (127.0.0.1 unless
configured), and structured JSON logs."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "HealthServer", "setup_logging"]


class Metrics:
    """The daemon's metrics, in their own registry (several daemons can share a process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter("streamrnn_messages_consumed_total", "Input messages consumed", registry=r)
        self.events = Counter("streamrnn_events_total", "Input events decoded and given to the detector",
                              registry=r)
        self.events_skipped = Counter("streamrnn_events_replay_skipped_total",
                                      "Events already applied before a restart (skipped)", registry=r)
        self.events_same_ts = Counter("streamrnn_events_same_ts_dropped_total",
                                      "Events at their stream's last applied timestamp (not applied)", registry=r)
        self.dead_letters = Counter("streamrnn_dead_letters_total", "Messages sent to the dead-letter topic",
                                    registry=r)
        self.alerts = Counter("streamrnn_alerts_total", "Alert records produced", ["kind"], registry=r)
        self.lag = Gauge("streamrnn_consumer_lag", "Messages behind the end of the partition",
                         ["topic", "partition"], registry=r)
        self.streams = Gauge("streamrnn_streams_held", "Streams with state in memory", registry=r)
        self.evictions = Gauge("streamrnn_stream_evictions", "Streams evicted from memory so far", registry=r)
        self.batch_seconds = Histogram("streamrnn_batch_seconds", "Time to decode, score and emit a micro-batch",
                                       buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2),
                                       registry=r)
        # Where produce-to-alert latency goes: input hop (record age when the poll returns it)
        # and output hop (a poll's outputs handed to the producer until all are acknowledged).
        latency = (.001, .002, .005, .01, .015, .02, .03, .05, .075, .1, .2, .5, 1, 2)
        self.record_age = Histogram("streamrnn_record_age_seconds",
                                    "Age (now - Kafka timestamp) of the oldest record of each partition's "
                                    "batch when the poll returned it", buckets=latency, registry=r)
        self.output_ack_seconds = Histogram("streamrnn_output_ack_seconds",
                                            "From handing a batch's output records to the producer to the "
                                            "acknowledgement of the last of them", buckets=latency, registry=r)
        self.events_per_second = Gauge("streamrnn_events_per_second", "Events scored per second (last 10 s)",
                                       registry=r)
        self.checkpoint_age = Gauge("streamrnn_checkpoint_age_seconds", "Seconds since the last checkpoint",
                                    registry=r)
        self.checkpoint_seconds = Histogram("streamrnn_checkpoint_seconds", "Checkpoint duration",
                                            buckets=(.001, .005, .01, .05, .1, .5, 1, 5), registry=r)
        self.checkpoint_bytes = Counter("streamrnn_checkpoint_bytes_total",
                                        "Bytes of state written by checkpoints, by kind (local store: full "
                                        "snapshot or delta; changelog: rows)", ["kind"], registry=r)
        self.backpressure = Counter("streamrnn_backpressure_pauses_total",
                                    "Times input was paused for the producer to catch up", registry=r)
        self.model_reloads = Counter("streamrnn_model_reloads_total", "Model file reloads", registry=r)
        self._rate_t0 = time.monotonic()
        self._rate_n = 0
        self.last_checkpoint = time.monotonic()

    def count_events(self, n: int) -> None:
        self.events.inc(n)
        self._rate_n += n
        now = time.monotonic()
        if now - self._rate_t0 >= 10.0:
            self.events_per_second.set(self._rate_n / (now - self._rate_t0))
            self._rate_t0, self._rate_n = now, 0

    def render(self) -> bytes:
        self.checkpoint_age.set(time.monotonic() - self.last_checkpoint)
        return generate_latest(self.registry)


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` (the loop turned recently) and ``/readyz`` (kernels
    compiled and the consumer joined its group) in a background thread."""

    def __init__(self, metrics: Metrics, host: str, port: int, *, stall_s: float = 60.0) -> None:
        self.metrics = metrics
        self.ready = False
        self.heartbeat = time.monotonic()
        self.stall_s = stall_s
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, owner.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = time.monotonic() - owner.heartbeat < owner.stall_s
                    self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
                elif path == "/readyz":
                    self._send(200 if owner.ready else 503, b"ready\n" if owner.ready else b"not ready\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code, body, ctype="text/plain; charset=utf-8"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet: the daemon logs JSON
                pass

        self.server = ThreadingHTTPServer((host, port if port > 0 else 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", stream=None) -> None:
    """Send the daemon's logs (``daemon.*``) as JSON lines to stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("daemon")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
