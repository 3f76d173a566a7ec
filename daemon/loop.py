"""The daemon: a kafka-python consumer group loop around one :class:`~streamrnn.detector.Detector`
per assigned input partition (the Kafka Streams task model).

Per poll: decode each partition's messages in one batch, score them with the partition's
detector, and hand the alert records (keyed by stream) and dead letters to the producer at
once: alert delivery never waits for a checkpoint. Checkpoint protocol, in this order, every
``checkpoint_interval_ms`` or ``checkpoint_events``, on rebalance and at shutdown:

0. freeze each dirty partition's state as of its last processed message (a snapshot's bytes,
   or the changed changelog rows) and close the current *send epoch*: every output record
   of the covered events was sent in this epoch or an earlier one;
1. wait until every record of those epochs is acknowledged;
2. save the frozen state (local snapshot written by a writer thread: fsync off the loop; or
   changelog rows sent, then acknowledged);
3. commit the offsets after the last processed message of the frozen state.

Between interval checkpoints the steps advance while the loop goes on scoring (one
checkpoint in flight at a time; its commit is asynchronous, answered in a later poll); on
rebalance, model change and shutdown the loop blocks until they are done (finishing the one
in flight first, sending its commit again synchronously).

A crash between any two steps replays input whose events the restored state either lacks
(they are applied again, their alerts produced again with the same ids) or already holds
(their offsets are at or below the streams' ``last_offset``, so they are skipped).
"""

from __future__ import annotations

import gc
import logging
import operator
from concurrent.futures import Future, ThreadPoolExecutor
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from daemon.checkpoint import ChangelogStore, LocalStore, RowCodec, confluent_records, kafka_python_records
from daemon.codec import EVENT_OFFSET_SHIFT, Decoder, Format, Rejected, encode_events
from daemon.config import DaemonConfig
from daemon.errors import DaemonError
from daemon.fastpoll import FetchState, send_fetches_without_waiting, skip_known_coordinator_round_trip
from daemon.fastrecords import parse_records_fast
from daemon.metrics import HealthServer, Metrics, setup_logging
from streamrnn.alerts import encode_alert
from streamrnn.compiling import compiling_message, on_first_compile
from streamrnn.detector import Detector, input_features
from streamrnn.errors import StreamrnnError
from streamrnn.model import Model

__all__ = ["Daemon", "run_daemon", "DLQ_HEADERS"]

log = logging.getLogger("daemon.loop")
#: Header names on dead letters.
DLQ_HEADERS = ("streamrnn.reason", "streamrnn.topic", "streamrnn.partition", "streamrnn.offset")
_SCORE = msgspec.json.Encoder()


class _ScoreRecord(msgspec.Struct, gc=False):
    """A record of the scores topic."""

    stream: str
    ts: int
    score: float  # NaN (null): not scored
    alert: bool
    predicted: dict[str, float]  # raw units; NaN (null): no prediction yet


def _info(msg: str, **fields) -> None:
    log.info(msg, extra={"fields": fields})


class _StoppedWhileStarting(BaseException):
    """Raised by the signal handler before the daemon connects (while it compiles, mostly):
    there is nothing to checkpoint yet. A BaseException, so no ``except Exception`` in the
    compiler takes it for a failed compile."""


@dataclass
class Task:
    """One assigned input partition: its detector and its progress."""

    topic: str
    partition: int
    detector: Detector
    touched: set[str] = field(default_factory=set)
    next_offset: int | None = None  # after the last processed message
    committed: int | None = None
    events_since: int = 0


class _SendCounter:
    """Unacknowledged produce requests, counted per send epoch, and the first delivery error.

    Only the loop writes ``sent`` and the per-epoch sent counts; acknowledgements are reported
    (under a lock) with the epoch the record was sent in, by kafka-python's I/O thread or, for
    confluent-kafka, by the loop itself when it serves the delivery reports once per turn. A
    checkpoint closes an epoch (:meth:`next_epoch`) and waits for :meth:`acked_through`.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.sent = 0
        self.acked = 0
        self.error: Exception | None = None
        self._sent: dict[int, int] = {}
        self._acked: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        """``n`` records were handed to the producer in the current epoch (loop thread)."""
        if n:
            self._sent[self.epoch] = self._sent.get(self.epoch, 0) + n
            self.sent += n

    def ok(self, epoch: int, _meta=None) -> None:
        with self._lock:
            self.acked += 1
            self._acked[epoch] = self._acked.get(epoch, 0) + 1

    def failed(self, epoch: int, exc=None) -> None:
        with self._lock:
            self.acked += 1
            self._acked[epoch] = self._acked.get(epoch, 0) + 1
            if self.error is None:
                self.error = exc

    def next_epoch(self) -> int:
        """Close the current epoch and return it; later sends belong to the next one."""
        self.epoch += 1
        return self.epoch - 1

    def acked_through(self, epoch: int) -> bool:
        """Whether every record sent in ``epoch`` or before has been acknowledged (or failed)."""
        with self._lock:
            for e in sorted(k for k in self._sent if k <= epoch):
                if self._acked.get(e, 0) < self._sent[e]:
                    return False
                del self._sent[e]  # complete: no more callbacks come for it
                self._acked.pop(e, None)
            return True

    @property
    def pending(self) -> int:
        return self.sent - self.acked


_IN_FLIGHT = object()


@dataclass
class _Checkpoint:
    """A checkpoint in flight: the frozen state of its partitions and how far it got."""

    epoch: int  # outputs of the covered events were sent in this epoch or before
    items: list  # (task, next offset, what the store prepared)
    started: float
    stage: str = "acks"  # -> "writing" (local) or "changelog" -> "committing" -> done
    future: Future | None = None
    changelog_epoch: int = -1
    commit: list | None = None  # (task, offset) of the asynchronous commit in flight
    commit_result: object = _IN_FLIGHT  # what its callback reported: an exception, or not


class Daemon:
    """The Kafka scoring service. ``Daemon(config).run()`` blocks until :meth:`stop`
    (or SIGTERM/SIGINT when signals are installed) and returns the exit code.

    ``counts`` after (or during) a run: messages ``consumed``, ``decoded`` (scored) and
    ``dead_lettered`` (consumed = decoded + dead_lettered), ``events``, ``alerts``.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.cfg = config
        self.metrics = Metrics()
        self.counts = {"consumed": 0, "decoded": 0, "dead_lettered": 0, "events": 0, "events_skipped": 0,
                       "same_ts_dropped": 0, "alerts": 0, "checkpoints": 0}
        self.tasks: dict[tuple[str, int], Task] = {}
        self._stop = threading.Event()
        self._sends = _SendCounter()
        self._out: list[tuple] = []  # output records of the current poll, not yet sent
        self._pending: _Checkpoint | None = None  # the checkpoint in flight
        self._serve_outputs = None  # runs the delivery reports of a producer that has them
        self._fetch_state: FetchState | None = None  # the consumer's fetcher, when patched
        self._assign_error: Exception | None = None  # a partition whose state could not be restored
        self._writer: ThreadPoolExecutor | None = None  # writes local snapshots (fsync)
        self._last_ckpt = time.monotonic()
        self._events_since_ckpt = 0
        self.health: HealthServer | None = None
        self.model: Model | None = None
        self._model_stamp = None
        self._next_reload = 0.0
        self.ready = threading.Event()
        self._starting = True  # until the loop connects: a signal then stops at once
        self.first_batch_at: float | None = None  # perf_counter of the first and latest batch
        self.last_batch_at: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint, commit and return (signal-safe)."""
        self._stop.set()

    def run(self, install_signals: bool = True) -> int:
        """Run until stopped; returns 0 after a clean shutdown."""
        cfg = self.cfg
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        _info("starting", config=cfg.redacted(), pid=os.getpid())
        switch = sys.getswitchinterval()
        sys.setswitchinterval(cfg.switch_interval_ms / 1000)  # see DaemonConfig.switch_interval_ms
        try:
            return self._run()
        except _StoppedWhileStarting:
            _info("stopped while starting: nothing to checkpoint")
            return 0
        finally:
            sys.setswitchinterval(switch)

    def _on_signal(self, *_) -> None:
        self.stop()
        if self._starting:
            raise _StoppedWhileStarting

    def _run(self) -> int:
        cfg = self.cfg
        self.model = self._load_model()
        self._model_stamp = self._stamp()
        self._set_threads()
        self.decoder = self._decoder_for(self.model)
        with on_first_compile(lambda: _info(compiling_message("the kernels", "1-2 minutes on 2 cores"))):
            self._warm_up()
        self._starting = False
        if self._stop.is_set():  # stopped before the flag fell (or by stop() from a thread)
            raise _StoppedWhileStarting
        gc.freeze()  # start-up objects (model, kernels, clients) leave the GC's scans
        if cfg.metrics_port:
            self.health = HealthServer(self.metrics, cfg.metrics_host, cfg.metrics_port)
            _info("serving metrics", url=f"http://{cfg.metrics_host}:{self.health.port}/metrics")
        try:
            self._connect()
            try:
                self._loop()
                self._shutdown()
            finally:
                self._close()
        finally:
            if self.health:
                self.health.close()
        _info("stopped", counts=self.counts)
        return 0

    # ------------------------------------------------------------------ set-up
    def _load_model(self) -> Model:
        return Model.load(self.cfg.model)

    def _decoder_for(self, model: Model) -> Decoder:
        """Events carry the model's features but the one the detector derives (a --time-delta dt)."""
        cfg = self.cfg
        names = input_features(model)
        return Decoder(names, Format(cfg.stream_field, cfg.ts_field, cfg.value_field, cfg.values_field),
                       derived=list(model.feature_names)[len(names):])

    def _stamp(self):
        try:
            st = Path(self.cfg.model).stat()
            return (st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def _scoring_options(self) -> dict:
        opts = dict(self.cfg.detector)
        if self.cfg.scoring:
            from streamrnn.scoring import ScoringConfig

            opts["config"] = ScoringConfig.from_dict(self.cfg.scoring)
        return opts

    def new_detector(self, snapshot: bytes | None = None, table=None, model: Model | None = None) -> Detector:
        """A detector with the configured options: fresh, on ``table``, or from ``snapshot``."""
        model = model or self.model
        opts = self._scoring_options()
        if snapshot is not None:
            return Detector.restore(model, snapshot, **opts)
        if table is not None:
            opts.pop("max_streams", None)
            opts.pop("idle_timeout_ms", None)
            return Detector(model, table=table, **opts)
        return Detector(model, **opts)

    def _set_threads(self) -> None:
        """Numba's thread count for this (the loop's) thread."""
        import numba

        n = self.cfg.numba_threads or numba.config.NUMBA_NUM_THREADS
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))

    def _warm_up(self) -> None:
        """Compile (or load from Numba's cache) every kernel before the first event: the
        first records take the loop's own path (decode, score), then large batches (parallel
        id lookup, many waves), then both checkpoint stores' serialisers. A kernel loaded later
        would stop the loop (or a checkpoint) for milliseconds while it holds the GIL."""
        t0 = time.perf_counter()
        det = self.new_detector()
        names, fmt = self.decoder.features, self.decoder.fmt
        d = len(names)
        messages = [encode_events(["decode-a"], [1000 * k], np.zeros((1, d)), names, fmt=fmt) for k in range(2)]
        messages += [encode_events(["decode-a", "decode-b"], [2000, 2000], np.zeros((2, d)), names, fmt=fmt),
                     encode_events(["decode-c"], [2000], np.zeros((1, d)), names, fmt=fmt, arrow=True)]
        for lo, hi in ((0, 2), (2, 4)):  # single-event messages alone, then arrays and Arrow
            offs = list(range(lo, hi))
            score_batch(det, self.decoder.decode(messages[lo:hi], [None] * (hi - lo), offs), offs)
        n = 16384
        ids = [f"warm-up-{i}" for i in range(n // 2)] * 2
        ts = np.repeat(np.array([3000, 4000], np.int64), n // 2)
        for k in range(2):
            det.process(ids, np.zeros((n, d)), ts + 2000 * k, offsets=np.arange(n, dtype=np.int64) + n * k + 8)
        det.table.copy().snapshot()  # the local store's snapshot
        RowCodec(det.table).export(det.table, ["warm-up-0", "decode-a"])  # deltas and changelog rows
        _info("kernels ready", seconds=round(time.perf_counter() - t0, 3))

    def _connect(self) -> None:
        """Open the clients and subscribe. A transient failure (a retriable Kafka error, such
        as a connection the broker reset, e.g. while it still cleans up after a killed
        member) closes what was opened and tries again with backoff until
        ``request_timeout_ms`` after the first attempt; anything else fails at once."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.request_timeout_ms / 1000
        delay = 0.1
        while True:
            try:
                return self._connect_once()
            except (KafkaError, ConnectionError) as exc:
                transient = isinstance(exc, ConnectionError) or getattr(exc, "retriable", False)
                self._close()
                if not transient or self._stop.is_set() or time.monotonic() + delay > deadline:
                    raise DaemonError(f"cannot connect to Kafka at {cfg.bootstrap}: {exc!r}") from None
                log.warning("Kafka not reachable, retrying", extra={"fields": {
                    "reason": repr(exc), "retry_in_s": delay}})
                self._stop.wait(delay)
                delay = min(2 * delay, 2.0)

    def _connect_once(self) -> None:
        cfg = self.cfg
        common = cfg.kafka_common()
        for name in ("consumer", "producer", "admin"):
            setattr(self, name, None)
        try:
            self.admin = KafkaAdminClient(**common)
            self.inputs = self._input_partitions()
            self._create_outputs()
            self.producer = self._producer()
            self.consumer = KafkaConsumer(
                **common, group_id=cfg.group, enable_auto_commit=False,
                auto_offset_reset=cfg.auto_offset_reset, fetch_min_bytes=cfg.fetch_min_bytes,
                fetch_max_wait_ms=cfg.fetch_max_wait_ms, max_partition_fetch_bytes=cfg.max_partition_fetch_bytes,
                max_poll_records=cfg.max_poll_records, session_timeout_ms=cfg.session_timeout_ms,
                heartbeat_interval_ms=cfg.heartbeat_interval_ms, max_poll_interval_ms=cfg.max_poll_interval_ms)
        except OSError as exc:
            if isinstance(exc, ConnectionError):
                raise  # transient: _connect decides
            raise DaemonError(f"cannot connect to Kafka at {cfg.bootstrap}: {exc}") from None
        if cfg.state_store == "local":
            self.store = LocalStore(cfg.state_dir)
        else:
            self.store = ChangelogStore(cfg.changelog, self.producer, self._changelog_reader(), self.inputs)
        skip_known_coordinator_round_trip(self.consumer)
        self._fetch_state = send_fetches_without_waiting(self.consumer)
        parse_records_fast(self.consumer)
        self.consumer.subscribe(cfg.input, listener=_Listener(self))

    def _producer(self):
        cfg = self.cfg
        if cfg.producer_client == "confluent-kafka":
            from daemon.output import ConfluentProducer

            return ConfluentProducer(cfg)
        # Idempotent with acks=all: several requests in flight (latency) without
        # reordering or duplicating alerts on retries.
        return KafkaProducer(**cfg.kafka_common(), acks=cfg.acks if cfg.acks == "all" else int(cfg.acks),
                             linger_ms=cfg.linger_ms, batch_size=cfg.batch_size,
                             enable_idempotence=cfg.acks == "all", max_in_flight_requests_per_connection=5)

    def _changelog_reader(self):
        """How the changelog store reads a partition back: librdkafka when the outputs use it
        (records parsed in C), else a group-less kafka-python consumer."""
        if self.cfg.producer_client == "confluent-kafka":
            from daemon.output import confluent_connection

            return confluent_records(confluent_connection(self.cfg))
        return kafka_python_records(self._plain_consumer)

    def _plain_consumer(self):
        consumer = KafkaConsumer(**self.cfg.kafka_common(), enable_auto_commit=False, group_id=None,
                                 fetch_max_wait_ms=self.cfg.fetch_max_wait_ms)
        parse_records_fast(consumer)  # a restore reads every row of the partition's changelog
        return consumer

    def _input_partitions(self) -> list[tuple[str, int]]:
        existing = set(self.admin.list_topics())
        missing = [t for t in self.cfg.input if t not in existing]
        if missing:
            raise DaemonError(f"input topic(s) {missing} do not exist on {self.cfg.bootstrap}: create them "
                              f"with your Kafka tools (their partition count is the daemon's parallelism), "
                              f"or produce to them first (`streamrnn replay FILE --to-kafka ... --topic NAME`)")
        out = []
        for desc in self.admin.describe_topics(self.cfg.input):
            out += [(desc["name"], p["partition_index"]) for p in desc["partitions"]]
        order = {t: i for i, t in enumerate(self.cfg.input)}
        return sorted(out, key=lambda tp: (order[tp[0]], tp[1]))

    def _create_outputs(self) -> None:
        cfg = self.cfg
        n = cfg.topic_partitions or max(1, max(p for _, p in self.inputs) + 1)
        wanted = {cfg.alerts: n, cfg.dead_letter_topic: n}
        if cfg.scores:
            wanted[cfg.scores] = n
        if cfg.state_store == "changelog":
            wanted[cfg.changelog] = len(self.inputs)
        existing = set(self.admin.list_topics())
        missing = {t: k for t, k in wanted.items() if t not in existing}
        if not missing:
            return
        if not cfg.create_topics:
            raise DaemonError(f"output topic(s) {sorted(missing)} do not exist and create_topics is off")
        for topic, parts in missing.items():
            # The changelog keeps the last row per stream: compacted, like Kafka Streams'.
            configs = {"cleanup.policy": "compact"} if topic == cfg.changelog and cfg.state_store == "changelog" else {}
            try:
                self.admin.create_topics([NewTopic(topic, parts, cfg.replication_factor, topic_configs=configs)])
                _info("created topic", topic=topic, partitions=parts)
            except TopicAlreadyExistsError:  # another daemon of the group was faster
                pass

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        cfg = self.cfg
        self._serve_outputs = getattr(self.producer, "serve", None)
        self.ready.set()
        if self.health:
            self.health.ready = True
        while not self._stop.is_set():
            if self.health:
                self.health.heartbeat = time.monotonic()
            # With a checkpoint in flight, turn sooner to advance it when input is idle.
            wait = cfg.batch_max_wait_ms if self._pending is None else min(cfg.batch_max_wait_ms, 5)
            batch = self.consumer.poll(timeout_ms=wait, max_records=cfg.batch_max_events)
            if batch:
                self._prefetch(batch)
            self._check_assigned()
            t0 = time.perf_counter()
            if batch and self.first_batch_at is None:
                self.first_batch_at = t0
            now_ms = time.time() * 1000
            for tp, records in batch.items():
                task = self.tasks.get((tp.topic, tp.partition))
                if task is None or not records:  # revoked during this poll
                    continue
                self.metrics.record_age.observe(max(0.0, now_ms - records[0].timestamp) / 1000)
                self._process(task, records)
                # Each partition's alerts leave before the next partition is scored: the
                # poll's other partitions were a third of an alert's time in the daemon.
                self._drain()
            self._drain()
            if self._serve_outputs is not None:  # delivery reports run on this thread
                self._serve_outputs()
            if batch:
                self.last_batch_at = time.perf_counter()
                self.metrics.batch_seconds.observe(self.last_batch_at - t0)
            if self._sends.error is not None:
                raise DaemonError(f"producing to Kafka failed: {self._sends.error}")
            if self._sends.pending > cfg.max_pending_messages:
                self._backpressure()
            self._turn_checkpoints()
            if cfg.model_reload_interval_s and time.monotonic() >= self._next_reload:
                self._next_reload = time.monotonic() + cfg.model_reload_interval_s
                self._maybe_reload()

    def _prefetch(self, batch: dict) -> None:
        """Put the next fetch request in flight before scoring ``batch``. kafka-python sends one
        only when a poll starts with no buffered records, so a poll that had to wait for its
        records returns with none in flight: input arriving while the loop scores waited in
        the broker until the next poll asked for it (a fetch round trip and a wake-up of the
        consumer's I/O thread on top of the scoring time, every turn).

        kafka-python 3 runs its network on an I/O thread. The request is handed to that
        thread without waiting for it (its network manager's thread-safe ``call_soon``): the
        fetcher's public ``send_fetches`` is the same request but blocks the loop for a round
        trip to that thread (traced under load: p50 1.6 ms, p99 22 ms per turn), and a
        zero-timeout poll took three (group coordinator check, send, a zero wait). The
        fetcher skips partitions that already have a fetch in flight, so the next poll never
        sends a second one. Records a poll would have added to ``batch`` are returned by the
        next poll at once."""
        if self._fetch_state is not None and self._fetch_state.sent_after_drain:
            return  # the poll queued it already (daemon.fastpoll)
        fetcher = getattr(self.consumer, "_fetcher", None)
        manager = getattr(fetcher, "_manager", None)
        if hasattr(manager, "call_soon") and hasattr(fetcher, "_send_fetches_async"):  # kafka-python 3 (pinned)
            manager.call_soon(fetcher._send_fetches_async)
        elif hasattr(fetcher, "send_fetches"):
            fetcher.send_fetches()
        else:  # its public way
            self._prefetch_poll(batch)

    def _prefetch_poll(self, batch: dict) -> None:
        """Records a zero-timeout poll already has join ``batch``, after those of the same
        partition; it sends the next fetch request on the way."""
        room = self.cfg.batch_max_events - sum(len(r) for r in batch.values())
        if room <= 0:  # records left in the buffer: the next poll returns them at once
            return
        for tp, records in self.consumer.poll(timeout_ms=0, max_records=room).items():
            batch.setdefault(tp, []).extend(records)

    def _turn_checkpoints(self) -> None:
        """Once per loop turn: advance the checkpoint in flight, start one when due."""
        cfg = self.cfg
        if self._pending is not None and self._advance(self._pending, block=False):
            self._pending = None
        if self._pending is None and (self._events_since_ckpt >= cfg.checkpoint_events
                                      or time.monotonic() - self._last_ckpt >= cfg.checkpoint_interval_ms / 1000):
            self._pending = self._begin(list(self.tasks.values()))

    def _send(self, topic, key, value, headers=None, partition=None) -> None:
        """Queue an output record; :meth:`_drain` hands the poll's records to the producer."""
        self._out.append((topic, key, value, headers, partition))

    def _send_row(self, topic, key, value, partition, headers) -> None:
        self._send(topic, key, value, headers, partition)

    def _drain(self) -> None:
        """Send the queued records in one burst: appends to the producer's open batches do
        not wake its I/O thread each time (a thread switch per record under load)."""
        out, self._out = self._out, []
        if not out:
            return
        epoch = self._sends.epoch
        ok, failed = self._sends.ok, self._sends.failed
        t0 = time.perf_counter()
        for topic, key, value, headers, partition in out:
            fut = self.producer.send(topic, key=key, value=value, headers=headers, partition=partition)
            fut.add_callback(ok, epoch)
            fut.add_errback(failed, epoch)
        # The last record sent stands for the burst (one timing callback, not one per record;
        # a burst over several partitions may be acknowledged in more than one response).
        observe = self.metrics.output_ack_seconds.observe
        fut.add_callback(lambda _m: observe(time.perf_counter() - t0))
        self._sends.add(len(out))

    def _process(self, task: Task, records) -> None:
        # Per call, not per record: at a fixed rate the loop makes one call per partition
        # and poll with a few dozen records, where fixed costs dominate.
        offsets = list(map(_OFFSET, records))
        dec = self.decoder.decode(list(map(_VALUE, records)), list(map(_KEY, records)), offsets)
        for rej in dec.rejected:
            self._dead_letter(records[rej.index], rej.reason)
        n, dead = 0, len(dec.rejected)  # n: events the detector took
        if len(dec):
            det = task.detector
            before = det.count("replay_skipped")
            same_before = det.count("same_ts_dropped")
            for res in score_batch(det, dec, offsets):
                if isinstance(res, Rejected):  # refused by the detector: its whole message
                    self._dead_letter(records[res.index], res.reason)
                    dead += 1
                    continue
                n += len(res)
                if res.alerts:
                    self._send_alerts(res.alerts)
                if self.cfg.scores:
                    self._send_scores(res, getattr(res, "applied", None))
                # Rows (or tombstones) the next checkpoint writes: both stores save what changed.
                task.touched.update(res.stream_ids)
                if res.evicted:
                    task.touched.update(res.evicted)
            skipped = det.count("replay_skipped") - before
            if skipped:
                self.counts["events_skipped"] += skipped
                self.metrics.events_skipped.inc(skipped)
            same = det.count("same_ts_dropped") - same_before
            if same:
                self.counts["same_ts_dropped"] += same
                self.metrics.events_same_ts.inc(same)
        task.next_offset = offsets[-1] + 1
        task.events_since += n
        self._events_since_ckpt += n
        counts = self.counts
        counts["consumed"] += len(records)
        counts["decoded"] += len(records) - dead
        counts["events"] += n
        self.metrics.messages.inc(len(records))
        if dead:
            counts["dead_lettered"] += dead
            self.metrics.dead_letters.inc(dead)
        self.metrics.count_events(n)

    def _send_alerts(self, alerts: list) -> None:
        topic, send = self.cfg.alerts, self._send
        for a in alerts:
            send(topic, a.stream.encode(), encode_alert(a))
        self.counts["alerts"] += len(alerts)
        opened = sum(a.kind == "open" for a in alerts)
        for kind, k in (("open", opened), ("close", len(alerts) - opened)):
            if k:
                self.metrics.alerts.labels(kind).inc(k)

    def _dead_letter(self, r, reason: str) -> None:
        """Send input record ``r`` unchanged to the dead-letter topic, with why and whence."""
        headers = list(r.headers or []) + [
            (DLQ_HEADERS[0], reason.encode()), (DLQ_HEADERS[1], r.topic.encode()),
            (DLQ_HEADERS[2], str(r.partition).encode()), (DLQ_HEADERS[3], str(r.offset).encode())]
        self._send(self.cfg.dead_letter_topic, r.key, r.value, headers)
        log.warning("dead letter", extra={"fields": {"topic": r.topic, "partition": r.partition,
                                                     "offset": r.offset, "reason": reason[:300]}})

    def _send_scores(self, res, applied) -> None:
        """One record per applied event to the scores topic (columns converted once per batch
        and records encoded from a Struct: 3x less time per event than a dict per event)."""
        rows = np.flatnonzero(applied) if applied is not None else np.arange(len(res))
        sid = res.stream_ids
        ids = [sid[i] for i in rows.tolist()] if isinstance(sid, list) else np.asarray(sid)[rows].tolist()
        names = self.model.feature_names
        topic, send, encode = self.cfg.scores, self._send, _SCORE.encode
        for s, t, score, alert, pred in zip(ids, res.timestamps[rows].tolist(), res.score[rows].tolist(),
                                            res.alert[rows].tolist(),
                                            res.prediction[rows].astype(np.float64).tolist()):
            # Non-finite floats encode as null (not scored, no prediction yet).
            send(topic, s.encode(), encode(_ScoreRecord(s, t, score, alert, dict(zip(names, pred)))))

    def _backpressure(self) -> None:
        """The producer is behind: stop fetching input until it has caught up."""
        parts = list(self.consumer.assignment())
        self.consumer.pause(*parts)
        self.metrics.backpressure.inc()
        try:
            self.producer.flush()
        finally:
            self.consumer.resume(*parts)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, tasks: list[Task]) -> None:
        """Flush outputs, save state, commit offsets (see the module docstring), blocking
        until done; a checkpoint in flight is finished first."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._advance(pending, block=True)
        pending = self._begin([t for t in tasks if (t.topic, t.partition) in self.tasks])
        if pending is not None:
            self._advance(pending, block=True)

    def _begin(self, tasks: list[Task]) -> _Checkpoint | None:
        """Step 0: freeze the dirty partitions' state and close the send epoch."""
        t0 = time.perf_counter()
        self._drain()
        self._last_ckpt = time.monotonic()
        self._events_since_ckpt = 0
        dirty = [t for t in tasks if t.next_offset is not None and t.next_offset != t.committed]
        self._update_gauges(tasks)
        if not dirty:
            self.metrics.last_checkpoint = self._last_ckpt
            return None
        items = []
        for t in dirty:
            if self.cfg.detector.get("idle_timeout_ms") is not None:
                t.touched.update(t.detector.evict_idle(int(time.time() * 1000)))
            items.append((t, t.next_offset, self.store.prepare(t.topic, t.partition, t.detector, t.touched)))
            t.touched = set()
            t.events_since = 0
        return _Checkpoint(self._sends.next_epoch(), items, t0)

    def _check_sends(self, what: str) -> None:
        if self._sends.error is not None:
            raise DaemonError(f"{what} failed: {self._sends.error}")

    def _advance(self, ck: _Checkpoint, block: bool) -> bool:
        """Take ``ck`` as far as it can go now (to the end with ``block``); True when done."""
        if ck.stage == "acks":  # 1. alerts and dead letters of the covered events acknowledged
            if block:
                self.producer.flush()
            elif not self._sends.acked_through(ck.epoch):
                return False
            self._check_sends("producing to Kafka")
            if self.store.kind == "changelog":  # 2. rows sent, acknowledged below
                for _t, _off, prepared in ck.items:
                    kind, nbytes = self.store.write(prepared, send=self._send_row)
                    self.metrics.checkpoint_bytes.labels(kind).inc(nbytes)
                self._drain()
                ck.changelog_epoch = self._sends.next_epoch()
                ck.stage = "changelog"
            else:  # 2. snapshot files written (and fsynced) by the writer thread
                if self._writer is None:
                    self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
                ck.future = self._writer.submit(self._write_local, [p for _t, _o, p in ck.items])
                ck.stage = "writing"
        if ck.stage == "writing":
            if not block and not ck.future.done():
                return False
            ck.future.result()  # raises what the write raised
        elif ck.stage == "changelog":
            if block:
                self.producer.flush()
            elif not self._sends.acked_through(ck.changelog_epoch):
                return False
            self._check_sends("writing the changelog")
        if ck.stage != "committing":
            ck.commit = [(t, off) for t, off, _p in ck.items if self.tasks.get((t.topic, t.partition)) is t]
            if not block and ck.commit:
                # 3. asynchronously: a synchronous commit stalled the loop (and every event
                # waiting in the fetch buffer) for a broker round trip, 2-75 ms measured.
                ck.stage = "committing"
                self.consumer.commit_async(_offsets(ck.commit), callback=lambda _o, res: _set_result(ck, res))
                return False
        if ck.stage == "committing" and not block:
            if ck.commit_result is _IN_FLIGHT:  # the callback runs in a later poll, on this thread
                return False
            if isinstance(ck.commit_result, Exception):
                return self._commit_failed(ck, ck.commit_result)
        else:  # 3. blocking (rebalance, model change, shutdown); a commit in flight is sent again
            ck.commit = [(t, off) for t, off in ck.commit if self.tasks.get((t.topic, t.partition)) is t]
        if block and ck.commit:
            try:
                self.consumer.commit(_offsets(ck.commit))
            except CommitFailedError as exc:
                return self._commit_failed(ck, exc)
        for t, off in ck.commit:
            t.committed = off
        self.counts["checkpoints"] += 1
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - ck.started)
        self.metrics.last_checkpoint = time.monotonic()
        return True

    def _commit_failed(self, ck: _Checkpoint, exc: Exception) -> bool:
        """The commit of ``ck`` failed. Its state and outputs are saved, so the offsets can
        wait: a retriable error leaves them for the next checkpoint; a rebalance loses the
        partitions. Returns True (the checkpoint is over)."""
        if isinstance(exc, CommitFailedError):
            self._lost([t for t, _ in ck.commit], exc)
        else:
            log.warning("offset commit failed; the next checkpoint commits again", extra={"fields": {
                "partitions": [f"{t.topic}[{t.partition}]" for t, _ in ck.commit], "reason": repr(exc)}})
        return True

    def _write_local(self, prepared: list) -> None:
        for p in prepared:
            kind, nbytes = self.store.write(p)
            self.metrics.checkpoint_bytes.labels(kind).inc(nbytes)

    def _lost(self, tasks: list[Task], exc: Exception) -> None:
        """The group moved these partitions while we worked on them (e.g. a stall beyond
        max_poll_interval_ms). Outputs are flushed and state saved, so whoever owns them now
        replays from the last commit and skips what the saved state already holds; we drop
        our copies and reload from the store if they come back."""
        log.warning("offset commit failed: partitions were reassigned", extra={"fields": {
            "partitions": [f"{t.topic}[{t.partition}]" for t in tasks], "reason": str(exc)}})
        for t in tasks:
            if self.tasks.get((t.topic, t.partition)) is not t:
                continue  # already revoked (and perhaps assigned again: a new task)
            self.tasks.pop((t.topic, t.partition))
            forget = getattr(self.store, "forget", None)
            if forget:
                forget(t.topic, t.partition)

    def _update_gauges(self, tasks: list[Task]) -> None:
        self.metrics.streams.set(sum(len(t.detector.table) for t in self.tasks.values()))
        self.metrics.evictions.set(sum(t.detector.table.evictions for t in self.tasks.values()))
        for t in tasks:
            hw = self.consumer.highwater(TopicPartition(t.topic, t.partition))
            if hw is not None and t.next_offset is not None:
                self.metrics.lag.labels(t.topic, str(t.partition)).set(max(0, hw - t.next_offset))

    # ------------------------------------------------------------------ rebalances
    def on_revoked(self, revoked) -> None:
        gone = [self.tasks[(tp.topic, tp.partition)] for tp in revoked if (tp.topic, tp.partition) in self.tasks]
        try:
            if gone:
                self.checkpoint(gone)
        finally:
            for t in gone:
                self.tasks.pop((t.topic, t.partition), None)
                forget = getattr(self.store, "forget", None)
                if forget:
                    forget(t.topic, t.partition)
        _info("partitions revoked", partitions=[f"{tp.topic}[{tp.partition}]" for tp in revoked])

    def on_assigned(self, assigned) -> None:
        for tp in assigned:
            key = (tp.topic, tp.partition)
            if key not in self.tasks:
                try:
                    det = self.store.load(tp.topic, tp.partition, self.new_detector)
                except Exception as exc:
                    # kafka-python logs and swallows a listener's exception: the partition
                    # would be consumed without a task (its records skipped). The loop
                    # raises it instead; its offsets stay uncommitted for the next owner.
                    self._assign_error = self._assign_error or exc
                    log.error("restoring partition state failed", extra={"fields": {
                        "partition": f"{tp.topic}[{tp.partition}]", "reason": repr(exc)}})
                    continue
                self.tasks[key] = Task(tp.topic, tp.partition, det)
        assigned = [tp for tp in assigned if (tp.topic, tp.partition) in self.tasks]
        _info("partitions assigned", partitions=[f"{tp.topic}[{tp.partition}]" for tp in assigned],
              streams=sum(len(self.tasks[(tp.topic, tp.partition)].detector.table) for tp in assigned))

    def _check_assigned(self) -> None:
        if self._assign_error is not None:
            raise DaemonError(f"cannot restore the state of an assigned partition: {self._assign_error!r}")

    # ------------------------------------------------------------------ model reload
    def _maybe_reload(self) -> None:
        stamp = self._stamp()
        if stamp is None or stamp == self._model_stamp:
            return
        self._model_stamp = stamp
        try:
            model = self._load_model()
        except StreamrnnError as exc:
            log.error("model file changed but cannot be loaded; keeping the current model",
                      extra={"fields": {"reason": str(exc)}})
            return
        same = Detector.columns_for(model).keys() == Detector.columns_for(self.model).keys() and all(
            (a.shape, a.dtype) == (b.shape, b.dtype) for a, b in
            zip(Detector.columns_for(model).values(), Detector.columns_for(self.model).values()))
        if same:
            for t in self.tasks.values():
                t.detector = self.new_detector(table=t.detector.table, model=model)
        else:
            self.checkpoint(list(self.tasks.values()))  # what the old model saw is committed
            for t in self.tasks.values():
                t.detector = self.new_detector(model=model)
        self.model = model
        self.decoder = self._decoder_for(model)
        self.metrics.model_reloads.inc()
        _info("model reloaded", kept_state=same, name=model.name)

    # ------------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        self.checkpoint(list(self.tasks.values()))

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        for name in ("consumer", "producer", "admin"):
            client = getattr(self, name, None)
            if client is not None:
                try:
                    client.close() if name != "producer" else client.close(timeout=5)
                except Exception as exc:  # closing is best effort; the commit is done
                    log.warning("close failed", extra={"fields": {"client": name, "reason": str(exc)}})
            setattr(self, name, None)


_OFFSET, _VALUE, _KEY = (operator.attrgetter(a) for a in ("offset", "value", "key"))


def _offsets(commit: list) -> dict:
    return {TopicPartition(t.topic, t.partition): OffsetAndMetadata(off, "", -1) for t, off in commit}


def _set_result(ck: _Checkpoint, result) -> None:
    """Commit callback (kafka-python 3 reports success as None, failure as an exception)."""
    ck.commit_result = result


class _Listener(ConsumerRebalanceListener):
    """kafka-python rebalance callbacks, forwarded to the daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def on_partitions_revoked(self, revoked) -> None:
        self.daemon.on_revoked(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        self.daemon.on_assigned(assigned)


def run_daemon(config: DaemonConfig, *, install_signals: bool = True, exit_on_overrun: bool = False) -> int:
    """Run a daemon with logging set up. With ``exit_on_overrun`` the process exits with code
    1 when shutdown takes longer than ``grace_period_s`` (as a supervisor would kill it)."""
    setup_logging(config.log_level)
    daemon = Daemon(config)
    if exit_on_overrun:
        def watchdog():
            daemon._stop.wait()
            time.sleep(config.grace_period_s)
            log.error("shutdown exceeded the grace period; exiting", extra={"fields": {}})
            os._exit(1)
        threading.Thread(target=watchdog, daemon=True).start()
    return daemon.run(install_signals=install_signals)


def score_batch(detector: Detector, dec, message_offsets: list[int]) -> list:
    """The detector's results for the decoded batch ``dec`` of the messages at
    ``message_offsets``: one result, or, when the detector refuses the batch (input the
    decoder let through but the detector cannot hold), one per message, with a
    :class:`~daemon.codec.Rejected` (index into the messages) for each message it refuses.
    A refused call leaves the detector unchanged (it validates before it touches state),
    so no event is applied twice."""
    try:
        return [detector.process(dec.stream_ids, dec.values, dec.timestamps, offsets=dec.offsets)]
    except StreamrnnError:
        pass
    index = {off: i for i, off in enumerate(message_offsets)}
    msg = dec.offsets >> EVENT_OFFSET_SHIFT
    cuts = np.flatnonzero(np.diff(msg)) + 1  # a message's events are contiguous
    out: list = []
    for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(msg)].tolist()):
        try:
            out.append(detector.process(dec.stream_ids[lo:hi], dec.values[lo:hi], dec.timestamps[lo:hi],
                                        offsets=dec.offsets[lo:hi]))
        except StreamrnnError as exc:
            out.append(Rejected(index[int(msg[lo])], f"refused by the detector: {exc}"))
    return out
