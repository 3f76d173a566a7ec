"""Kafka daemon throughput and latency beside raw kafka-python, in the same run, same broker.

1. Backlog: N single-event JSON messages (1000 streams) wait in a topic. Raw: kafka-python
   consumes them and decodes each with msgspec. Daemon: consumes, decodes, scores (GRU
   H=32), produces alerts, checkpoints and commits. Runs are interleaved (raw, daemon, raw,
   daemon); each reads the whole backlog from the start. Target: daemon >= 70% of raw. The
   raw reader is plain kafka-python; the daemon's consumer parses plain record batches with
   its own loop (daemon/fastrecords.py), so the daemon can exceed it.
2. Fixed rate: events produced at R messages/s with the send time as the event time; a raw
   kafka-python consumer and the daemon (a separate process) read the same topic at once.
   Latency = receive time - send time; for the daemon, of every alert record (about 10% of
   events are spikes that open or close an alert). Target: daemon p99 <= raw p99 + 20 ms.
   Every reader (raw, alerts) uses the daemon's consumer settings, printed at the start.
   Repeated ``--latency-runs`` times (median and range printed, with the load average);
   ``--relay`` adds a raw two-hop peer (kafka-python consumes, forwards the spikes with the
   daemon's producer settings, another consumer reads them): the daemon's path has two
   broker hops, the raw peer one. Each run prints every process's CPU and run-queue wait
   (time runnable without a core, Linux schedstat): where they wait for a core several times
   as long as they run, each hop's tail is the scheduler's.
3. Idle cost (``--idle-seconds``): % of a core of a reader polling an empty topic, of the
   idle daemon, and of the broker serving each (waiting fetches cost CPU on both sides).

Run: ``NUMBA_CACHE_DIR=.numba_cache .venv/bin/python benchmarks/bench_daemon.py [--messages N]
[--rate R] [--seconds S] [--latency-runs K] [--relay] [--fetch-max-wait-ms W] [--idle-seconds S]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.broker import start_broker  # noqa: E402
from daemon.config import DaemonConfig, load_config  # noqa: E402
from daemon.loop import Daemon  # noqa: E402
from daemon.producer import produce_events  # noqa: E402
from streamrnn.model import Model  # noqa: E402

#: Tuned client settings (the daemon's defaults). This broker does not answer a waiting fetch
#: when data arrives: it looks again after about half of ``fetch_max_wait_ms`` (measured), so
#: every consumer hop costs up to that much latency, and the daemon's path has two (input ->
#: daemon, alerts -> reader); 20 ms keeps each hop near 10 ms at a few % of a core while idle
#: (at 100 ms a hop costs up to ~50 ms). Swept 2/5/10/20 ms at load 6-9 (see daemon/config.py):
#: lower waits cost idle CPU (a reader 28/19/13/8% of a core) and shortened no hop.
#: The producer sends alerts after at most 1 ms.
TUNED = {"fetch_min_bytes": 1, "fetch_max_wait_ms": 20, "linger_ms": 1, "max_poll_records": 5000,
         "batch_max_wait_ms": 100, "batch_max_events": 5000}


def consumer_settings() -> dict:
    """kafka-python consumer settings of every reader in the benchmark (the raw peer, the
    alert reader) and of the daemon's consumer: the same for all, so the comparison is fair."""
    return {"fetch_min_bytes": TUNED["fetch_min_bytes"], "fetch_max_wait_ms": TUNED["fetch_max_wait_ms"],
            "max_poll_records": TUNED["max_poll_records"]}


CKPT_MS = 1000
#: linger_ms of the fixed-rate runs' input producer (both paths measure from the send time).
INPUT_LINGER_MS = [0]
GROUP = {"session_timeout_ms": 6000, "max_poll_interval_ms": 3000, "heartbeat_interval_ms": 500}


class Event(msgspec.Struct):
    stream: str
    ts: int
    value: float


def reader(bootstrap: str, topic: str, wait: bool = False):
    """A plain consumer (no group) with the shared settings, assigned every partition of
    ``topic`` from the beginning; ``wait``: until the topic exists."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                      max_partition_fetch_bytes=4 << 20, **consumer_settings())
    while wait and not c.partitions_for_topic(topic):
        time.sleep(0.05)
        c.topics()
    parts = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic))]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    return c


def make_model(path: Path) -> Path:
    m = Model.random("gru", n_features=1, hidden=[32], seed=0, name="bench-gru")
    m.save(path)
    return path


def persistence_model(path: Path) -> Path:
    """'next = last' on scaled values: a spike gives a large error and an alert."""
    h = 8
    layer = {"w_ih": np.zeros((3 * h, 1)), "w_hh": np.zeros((3 * h, h)), "b_ih": np.zeros(3 * h),
             "b_hh": np.zeros(3 * h)}
    layer["b_ih"][h:2 * h] = -30.0
    layer["w_ih"][2 * h:, 0] = 0.05
    m = Model(cell="gru", layers=[layer], head_weight=np.full((1, h), 1.0 / (0.05 * h)), head_bias=np.zeros(1),
              name="bench-persistence", feature_names=["value"])
    m.scaler_mean[:] = 100.0
    m.scaler_scale[:] = 10.0
    m.save(path)
    return path


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(name, partitions, 1)])
    admin.close()


# ---------------------------------------------------------------------- backlog
def raw_consume_decode(bootstrap: str, topic: str, n: int) -> float:
    """Messages/s for kafka-python to read ``n`` messages from the start and msgspec-decode them."""
    c = reader(bootstrap, topic)
    dec = msgspec.json.Decoder(Event)
    got = 0
    t0 = None
    while got < n:
        for recs in c.poll(timeout_ms=TUNED["batch_max_wait_ms"], max_records=TUNED["batch_max_events"]).values():
            if t0 is None:
                t0 = time.perf_counter()
            for r in recs:
                dec.decode(r.value)
            got += len(recs)
    dt = time.perf_counter() - t0
    c.close()
    return n / dt


def daemon_backlog(bootstrap: str, topic: str, n: int, model: Path, state: Path, group: str) -> float:
    """Messages/s for the daemon to score the backlog (first message consumed to last)."""
    cfg = load_config(env={}, overrides=dict(bootstrap=bootstrap, input=topic, alerts=f"{topic}-alerts",
                                             model=str(model), group=group, state_dir=str(state), **TUNED, **GROUP))
    d = Daemon(cfg)
    th = threading.Thread(target=d.run, kwargs={"install_signals": False}, daemon=True)
    th.start()
    while d.counts["consumed"] < n:  # a slow check: no GIL contention with the daemon's thread
        time.sleep(0.1)
    dt = d.last_batch_at - d.first_batch_at
    d.stop()
    th.join()
    return n / dt


# ---------------------------------------------------------------------- idle cost
def _idle_reader(bootstrap: str, topic: str, seconds: float, out, tuned: dict) -> None:
    """CPU seconds of a reader (shared settings) polling the empty ``topic`` for ``seconds``."""
    TUNED.update(tuned)
    c = reader(bootstrap, topic)
    c.poll(timeout_ms=500)  # connected, positions known: the steady idle state
    cpu0, end = time.process_time(), time.monotonic() + seconds
    while time.monotonic() < end:
        c.poll(timeout_ms=TUNED["batch_max_wait_ms"], max_records=TUNED["batch_max_events"])
    out.put(time.process_time() - cpu0)
    c.close()


def _cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def idle_cpu(broker, seconds: float, tmp: Path) -> tuple[float, float, float, float]:
    """% of a core while nothing arrives on a 4-partition topic: a raw reader and the broker
    serving it, then the daemon (its consumer group loop, producer and metrics idle) and
    the broker serving it. The waiting fetches cost CPU on both sides."""
    bs = broker.bootstrap
    topic = f"idle-{TUNED['fetch_max_wait_ms']}"
    create_topic(bs, topic, 4)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pr = ctx.Process(target=_idle_reader, args=(bs, topic, seconds, q, TUNED))
    pr.start()
    time.sleep(2.0)  # the reader's start-up (imports, connection) is not idle time
    b0 = _cpu_seconds(broker.process.pid)
    raw_cpu = q.get(timeout=seconds + 60)
    raw_broker = _cpu_seconds(broker.process.pid) - b0
    pr.join()
    model = persistence_model(tmp / "idle.safetensors")
    cmd = [sys.executable, "-m", "daemon", "--bootstrap", bs, "--input", topic, "--alerts", f"{topic}-alerts",
           "--model", str(model), "--group", f"{topic}-g", "--state-dir", str(tmp / f"{topic}-state")]
    for k, v in {**TUNED, **GROUP, "checkpoint_interval_ms": CKPT_MS, "metrics_port": 0}.items():
        cmd += ["--set", f"{k}={v}"]
    log_path = tmp / f"{topic}-daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            while b"partitions assigned" not in log_path.read_bytes():
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.1)
            time.sleep(1.0)
            d0, b0, t0 = _cpu_seconds(proc.pid), _cpu_seconds(broker.process.pid), time.monotonic()
            time.sleep(seconds)
            dt = time.monotonic() - t0
            daemon_cpu, daemon_broker = _cpu_seconds(proc.pid) - d0, _cpu_seconds(broker.process.pid) - b0
        finally:
            _stop(proc)
    return (100 * raw_cpu / seconds, 100 * raw_broker / seconds, 100 * daemon_cpu / dt, 100 * daemon_broker / dt)


# ---------------------------------------------------------------------- latency
def _raw_latency_reader(bootstrap: str, topic: str, n: int, out, tuned: dict) -> None:
    TUNED.update(tuned)  # a spawned process: the parent's settings
    c = reader(bootstrap, topic)
    dec = msgspec.json.Decoder(Event)
    lat = []
    out.put("ready")
    while len(lat) < n:
        for recs in c.poll(timeout_ms=TUNED["batch_max_wait_ms"], max_records=TUNED["batch_max_events"]).values():
            now = time.time() * 1000
            lat += [now - dec.decode(r.value).ts for r in recs]
    c.close()
    out.put(lat)


def _latency_reader(bootstrap: str, topic: str, stop_after: float, out, done, tuned: dict,
                    alerts: bool) -> None:
    """Produce-to-arrival latencies on ``topic`` until ``stop_after`` s after ``done``:
    (latency, last hop) per record, the last hop being arrival - the record's Kafka timestamp
    (the second producer's send time), so latency - last hop is the first hop plus processing."""
    from streamrnn.alerts import decode_alert

    TUNED.update(tuned)
    c = reader(bootstrap, topic, wait=True)
    dec = msgspec.json.Decoder(Event)
    lat = []
    out.put("ready")
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        for recs in c.poll(timeout_ms=TUNED["batch_max_wait_ms"], max_records=TUNED["batch_max_events"]).values():
            now = time.time() * 1000
            if alerts:
                lat += [(now - decode_alert(r.value).ts, now - r.timestamp) for r in recs]
            else:
                lat += [(now - dec.decode(r.value).ts, now - r.timestamp) for r in recs]
        if deadline is None and done.is_set():
            deadline = time.monotonic() + stop_after  # the producer finished: drain then stop
    c.close()
    out.put(lat)


def _relay(bootstrap: str, topic: str, out_topic: str, n: int, out, tuned: dict) -> None:
    """The raw two-hop peer: kafka-python consumes every message (same settings as the
    daemon) and forwards the spikes (the events that open or close alerts) to ``out_topic``
    with the daemon's producer settings. Its end-to-end latency is the floor of any
    consume-process-produce service on this broker and client."""
    from kafka import KafkaProducer

    TUNED.update(tuned)
    c = reader(bootstrap, topic)
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=TUNED["linger_ms"], acks="all", enable_idempotence=True)
    dec = msgspec.json.Decoder(Event)
    got = 0
    out.put("ready")
    while got < n:
        for recs in c.poll(timeout_ms=TUNED["batch_max_wait_ms"], max_records=TUNED["batch_max_events"]).values():
            for r in recs:
                if dec.decode(r.value).value >= 140.0:
                    p.send(out_topic, key=r.key, value=r.value)
            got += len(recs)
    p.flush()
    p.close()
    c.close()


def _sched_seconds(pid: int) -> dict[str, tuple[float, float]]:
    """Per thread of ``pid``: (CPU seconds, seconds runnable but waiting for a core), from
    Linux's /proc/<pid>/task/<tid>/schedstat; empty where that is unavailable."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns, wait_ns, _slices = map(int, f.read().split())
        except (OSError, ValueError):
            continue  # the thread has exited
        out[tid] = (run_ns / 1e9, wait_ns / 1e9)
    return out


def _host_busy_seconds() -> float | None:
    """CPU seconds every core of the host has been busy (all processes), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _sched_report(before: dict, after: dict, seconds: float, host_busy: float | None = None) -> str:
    """CPU and run-queue wait of each process over the run, in % of one core: a process
    whose threads wait for a core several times as long as they run is starved, and its
    latency tail is the scheduler's rather than its own."""
    parts = []
    total = 0.0
    for name, threads in after.items():
        cpu = wait = 0.0
        for tid, (c1, w1) in threads.items():
            c0, w0 = before[name].get(tid, (0.0, 0.0))
            cpu, wait = cpu + c1 - c0, wait + w1 - w0
        total += cpu
        parts.append(f"{name} {100 * cpu / seconds:.0f}/{100 * wait / seconds:.0f}")
    if not parts or not any(after.values()):
        return "CPU and run-queue wait: unavailable (no /proc/<pid>/task/*/schedstat)"
    host = f", the whole host {100 * host_busy / seconds:.0f}%" if host_busy is not None else ""
    return (f"CPU/run-queue wait, % of a core: {', '.join(parts)}; these processes {100 * total / seconds:.0f}%{host} "
            f"of {os.cpu_count()} cores")


def fixed_rate(bootstrap: str, rate: float, seconds: float, streams: int, tmp: Path, run: int = 0,
               relay: bool = False, broker_pid: int | None = None) -> tuple:
    from kafka import KafkaProducer

    topic, alerts = f"latency-in-{run}", f"latency-alerts-{run}"
    create_topic(bootstrap, topic, 4)
    create_topic(bootstrap, alerts, 4)
    model = persistence_model(tmp / "persistence.safetensors")
    toml = tmp / "latency.toml"
    toml.write_text("[scoring]\nwarmup = 5\nclose_after = 1\n")
    cmd = [sys.executable, "-m", "daemon", "--bootstrap", bootstrap, "--input", topic, "--alerts", alerts,
           "--model", str(model), "--group", f"latency-{run}", "--state-dir", str(tmp / f"lat-state-{run}"),
           "--config", str(toml)]
    for k, v in {**TUNED, **GROUP, "checkpoint_interval_ms": CKPT_MS, "metrics_port": -1}.items():
        cmd += ["--set", f"{k}={v}"]
    log_path = tmp / f"latency-daemon-{run}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    procs: list = []
    try:  # the daemon and the readers never outlive a failed run
        n = int(rate * seconds)
        ctx = mp.get_context("spawn")
        q_raw, q_alert, done = ctx.Queue(), ctx.Queue(), ctx.Event()
        raw = ctx.Process(target=_raw_latency_reader, args=(bootstrap, topic, n, q_raw, TUNED))
        alert = ctx.Process(target=_latency_reader, args=(bootstrap, alerts, 3.0, q_alert, done, TUNED, True))
        procs += [raw, alert]
        if relay:
            relayed = f"latency-relayed-{run}"
            create_topic(bootstrap, relayed, 4)
            q_relay, q_relay_ready = ctx.Queue(), ctx.Queue()
            procs += [ctx.Process(target=_relay, args=(bootstrap, topic, relayed, n, q_relay_ready, TUNED)),
                      ctx.Process(target=_latency_reader, args=(bootstrap, relayed, 3.0, q_relay, done, TUNED, False))]
        for pr in procs:
            pr.start()
        assert q_raw.get(timeout=60) == "ready" and q_alert.get(timeout=60) == "ready"
        if relay:
            assert q_relay.get(timeout=60) == "ready" and q_relay_ready.get(timeout=60) == "ready"
        while b"partitions assigned" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
        prod = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=INPUT_LINGER_MS[0], acks=1)
        rng = np.random.default_rng(0)
        enc = msgspec.json.Encoder()
        counts = np.zeros(streams, np.int64)
        pids = {"broker": broker_pid, "input producer": os.getpid(), "raw reader": procs[0].pid,
                "daemon": proc.pid, "alert reader": procs[1].pid}
        if relay:
            pids.update({"relay": procs[2].pid, "relay reader": procs[3].pid})
        pids = {k: v for k, v in pids.items() if v is not None}
        sched0, busy0 = {k: _sched_seconds(v) for k, v in pids.items()}, _host_busy_seconds()
        t0 = time.monotonic()
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            s = i % streams
            counts[s] += 1
            spike = counts[s] > 10 and rng.random() < 0.1
            value = 100.0 + rng.normal() + (80.0 if spike else 0.0)
            # The event time is the send time (ms), strictly increasing per stream.
            ts = max(int(time.time() * 1000), int(counts[s]))
            prod.send(topic, key=f"s{s}".encode(), value=enc.encode({"stream": f"s{s}", "ts": ts, "value": value}))
        prod.flush()
        achieved = n / (time.monotonic() - t0)
        busy1 = _host_busy_seconds()
        sched = _sched_report(sched0, {k: _sched_seconds(v) for k, v in pids.items()}, time.monotonic() - t0,
                              None if busy0 is None or busy1 is None else busy1 - busy0)
        done.set()
        stats = _daemon_stats(log_path)
        raw_lat = np.array(q_raw.get(timeout=120))
        alert_lat = np.array(q_alert.get(timeout=120))
        relay_lat = np.array(q_relay.get(timeout=120)) if relay else np.array([])
        for pr in procs:
            pr.join()
        prod.close()
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.terminate()
        _stop(proc)
        log.close()
    return raw_lat, alert_lat, achieved, stats, relay_lat, sched


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the daemon checkpoints and exits), SIGKILL if it has not within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _daemon_stats(log_path: Path) -> dict:
    """Batch and checkpoint times from the daemon's /metrics."""
    import json
    import urllib.request

    url = next(json.loads(line)["url"] for line in log_path.read_text().splitlines() if "serving metrics" in line)
    text = urllib.request.urlopen(url).read().decode()
    vals = {}
    for line in text.splitlines():
        if line.startswith(("streamrnn_batch_seconds", "streamrnn_checkpoint_seconds", "streamrnn_record_age",
                            "streamrnn_output_ack")):
            name, value = line.rsplit(" ", 1)
            vals[name] = float(value)
    return vals


def _histogram_quantiles(stats: dict, name: str) -> str:
    """p50 and p99 upper bounds (bucket edges, ms) of a daemon histogram from /metrics."""
    prefix = f'{name}_bucket{{le="'
    buckets = sorted((float(k[len(prefix):-2]), v) for k, v in stats.items() if k.startswith(prefix))
    total = stats.get(f"{name}_count", 0)
    if not total:
        return "none"
    edge = lambda q: next(f"{1000 * le:g}" for le, c in buckets if c >= q * total)  # noqa: E731
    return f"p50 <= {edge(0.5)} ms, p99 <= {edge(0.99)} ms (n={total:.0f})"


def _hops(lat: np.ndarray) -> str:
    """p50/p99 of the first hop with processing (second producer's send time - event time)
    and of the last hop (arrival - that send time), from (latency, last hop) rows."""
    if not len(lat):
        return "no records"
    first, last = lat[:, 0] - lat[:, 1], lat[:, 1]
    q = lambda a: f"p50 {np.percentile(a, 50):.1f} p99 {np.percentile(a, 99):.1f} ms"  # noqa: E731
    return f"event -> forwarded {q(first)};  forwarded -> read {q(last)}"


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2, help="backlog rounds (0: skip the backlog part)")
    ap.add_argument("--latency-runs", type=int, default=3, help="fixed-rate runs (each with raw and daemon)")
    ap.add_argument("--fetch-max-wait-ms", type=int, default=TUNED["fetch_max_wait_ms"])
    ap.add_argument("--producer-client", choices=["kafka-python", "confluent-kafka"], default=None,
                    help="the daemon's output producer client (default: the daemon's default)")
    ap.add_argument("--idle-seconds", type=float, default=0.0,
                    help="also measure the CPU of idle readers and of the idle daemon for this long (0: skip)")
    ap.add_argument("--relay", action="store_true",
                    help="also run the raw two-hop peer (consume, forward spikes, consume) in the fixed-rate runs")
    ap.add_argument("--input-linger-ms", type=int, default=INPUT_LINGER_MS[0],
                    help="linger_ms of the fixed-rate input producer (0: a produce request per message)")
    args = ap.parse_args()
    TUNED["fetch_max_wait_ms"] = args.fetch_max_wait_ms
    INPUT_LINGER_MS[0] = args.input_linger_ms
    if args.producer_client:
        TUNED["producer_client"] = args.producer_client
    os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    print("daemon settings:", ", ".join(f"{k}={v}" for k, v in TUNED.items()),
          f"acks={DaemonConfig().acks}, checkpoint_interval_ms={CKPT_MS}",
          "" if "producer_client" in TUNED else f"producer_client={DaemonConfig().producer_client}")
    print("consumer settings of the raw peer, the alert reader and the daemon alike:",
          ", ".join(f"{k}={v}" for k, v in consumer_settings().items()),
          f"poll timeout {TUNED['batch_max_wait_ms']} ms, max_records {TUNED['batch_max_events']};",
          f"fixed-rate input producer linger_ms={INPUT_LINGER_MS[0]}")
    with tempfile.TemporaryDirectory() as td, start_broker() as broker:
        tmp = Path(td)
        bs = broker.bootstrap
        n, s = args.messages, args.streams
        if args.rounds > 0:
            topic = "backlog"
            create_topic(bs, topic, 4)
            ids = [f"s{i % s}" for i in range(n)]
            ts = 1_767_225_600_000 + (np.arange(n) // s) * 1000
            x = np.random.default_rng(1).normal(100.0, 5.0, (n, 1))
            pr = produce_events(bs, topic, [(ids, ts, x)])
            print(f"backlog: {pr.messages} messages produced by kafka-python at {pr.messages / pr.seconds:,.0f}/s")
            model = make_model(tmp / "gru32.safetensors")
            raws, ours = [], []
            for r in range(args.rounds):
                raws.append(raw_consume_decode(bs, topic, n))
                ours.append(daemon_backlog(bs, topic, n, model, tmp / f"state{r}", f"bench-{r}"))
                print(f"  round {r}: raw kafka-python+msgspec {raws[-1]:,.0f} msg/s   "
                      f"daemon (GRU H=32) {ours[-1]:,.0f} msg/s   ratio {ours[-1] / raws[-1]:.2f}   ({_load()})")
            raw_best, our_best = max(raws), max(ours)
            print(f"backlog best: daemon {our_best:,.0f} events/s vs raw consume+decode {raw_best:,.0f} msg/s: "
                  f"{our_best / raw_best:.0%} (target >= 70%)")

        if args.idle_seconds > 0:
            raw_pct, raw_broker_pct, d_pct, d_broker_pct = idle_cpu(broker, args.idle_seconds, tmp)
            print(f"idle (fetch_max_wait_ms={TUNED['fetch_max_wait_ms']}, {args.idle_seconds:.0f} s, empty 4-partition "
                  f"topic): raw reader {raw_pct:.1f}% of a core + broker {raw_broker_pct:.1f}%;  daemon "
                  f"{d_pct:.1f}% + broker {d_broker_pct:.1f}%   ({_load()})")

        p = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
        diffs, rows, relay_diffs = [], [], []
        for run in range(args.latency_runs):
            raw_lat, alert_lat, achieved, stats, relay_lat, sched = fixed_rate(
                bs, args.rate, args.seconds, min(s, 1000), tmp, run, args.relay, broker.process.pid)
            alert_hops, relay_hops = _hops(alert_lat), _hops(relay_lat)
            alert_lat = alert_lat[:, 0] if len(alert_lat) else alert_lat
            relay_lat = relay_lat[:, 0] if len(relay_lat) else relay_lat
            rows.append((p(raw_lat, 50), p(raw_lat, 99), p(alert_lat, 50), p(alert_lat, 99)))
            diffs.append(rows[-1][3] - rows[-1][1])
            print(f"fixed rate run {run}: {achieved:,.0f} msg/s for {args.seconds:.0f} s: raw produce->consume "
                  f"p50 {rows[-1][0]:.1f} ms p99 {rows[-1][1]:.1f} ms ({len(raw_lat)} msgs);  "
                  f"daemon produce->alert p50 {rows[-1][2]:.1f} ms p99 {rows[-1][3]:.1f} ms "
                  f"({len(alert_lat)} alert records);  p99 difference {diffs[-1]:+.1f} ms   ({_load()})")
            if args.relay:
                relay_diffs.append(rows[-1][3] - p(relay_lat, 99))
                print(f"  raw two-hop peer (consume, forward spikes, consume) p50 {p(relay_lat, 50):.1f} ms "
                      f"p99 {p(relay_lat, 99):.1f} ms ({len(relay_lat)} records): daemon p99 - two-hop p99 "
                      f"{rows[-1][3] - p(relay_lat, 99):+.1f} ms")
                print(f"    two-hop peer by hop: {relay_hops}")
            print(f"  daemon by hop: {alert_hops}")
            print(f"  {sched}")
            b_n = stats.get("streamrnn_batch_seconds_count", 0)
            c_n = stats.get("streamrnn_checkpoint_seconds_count", 0)
            print(f"  daemon: {b_n:.0f} batches, mean "
                  f"{1000 * stats.get('streamrnn_batch_seconds_sum', 0) / max(b_n, 1):.2f} ms; {c_n:.0f} checkpoints "
                  f"(off the alert path), mean {1000 * stats.get('streamrnn_checkpoint_seconds_sum', 0) / max(c_n, 1):.1f}"
                  " ms from start to commit")
            print(f"  daemon histograms: input record age at poll {_histogram_quantiles(stats, 'streamrnn_record_age_seconds')};"
                  f"  batch {_histogram_quantiles(stats, 'streamrnn_batch_seconds')};"
                  f"  outputs to ack {_histogram_quantiles(stats, 'streamrnn_output_ack_seconds')}")
        if rows:
            med = np.median(np.array(rows), axis=0)
            print(f"fixed rate, median of {len(rows)} runs: raw p50 {med[0]:.1f} p99 {med[1]:.1f} ms;  daemon p50 "
                  f"{med[2]:.1f} p99 {med[3]:.1f} ms;  p99 difference daemon - raw: median {np.median(diffs):+.1f} ms, "
                  f"range {min(diffs):+.1f} to {max(diffs):+.1f} ms (target <= +20 ms)")
            if relay_diffs:
                print(f"  against the raw two-hop peer (an alert's path has two broker hops, the raw "
                      f"reader's one): p99 difference daemon - two-hop: median {np.median(relay_diffs):+.1f} ms, "
                      f"range {min(relay_diffs):+.1f} to {max(relay_diffs):+.1f} ms")


if __name__ == "__main__":
    main()
