"""Run a daemon in this fresh process and print, as JSON, the Numba kernels it compiled or
loaded after its warm-up (``python -m tests.late_compile_probe BOOTSTRAP STORE STATE_DIR``).

A fresh process, because a test process has long loaded every kernel some earlier test used.
The daemon first meets a backlog of 6000 events (polls of 5000 ids: another id-encoding path
than a few dozen) a checkpoint, 600 more events and a second checkpoint (every 200 ms at most), with the
local or the changelog store."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from numba.core.dispatcher import Dispatcher


def main(bootstrap: str, store: str, state_dir: str) -> None:
    late, warmed = [], threading.Event()
    compile_ = Dispatcher.compile

    def recording_compile(self, sig):
        before = len(self.overloads)
        out = compile_(self, sig)
        if warmed.is_set() and len(self.overloads) > before:
            late.append(f"{self.py_func.__module__}.{self.py_func.__qualname__}{sig}")
        return out

    Dispatcher.compile = recording_compile

    import numpy as np

    from daemon.config import load_config
    from daemon.loop import Daemon
    from daemon.producer import produce_events
    from tests.daemon_support import FAST_GROUP, create_topic, persistence_model, unique

    topic = unique("late-compile")
    create_topic(bootstrap, topic, 1)  # one partition: a poll's 5000 events in one detector call
    n = 6000
    ids = [f"s{i % 600}" for i in range(n)]
    ts = 1_767_225_600_000 + (np.arange(n) // 600) * 1000
    produce_events(bootstrap, topic, [(ids, ts, np.random.default_rng(0).normal(100, 5, (n, 1)))])
    model = persistence_model(Path(tempfile.mkdtemp()) / "p.safetensors")
    cfg = load_config(env={}, overrides=dict(
        bootstrap=bootstrap, input=topic, alerts=unique("alerts"), model=str(model), group=unique("g"),
        state_dir=state_dir, state_store=store, checkpoint_interval_ms=200, changelog_topic=unique("changelog"),
        max_poll_records=5000, batch_max_events=5000,
        **FAST_GROUP))
    daemon = Daemon(cfg)
    loop = daemon._loop

    def loop_after_warm_up():
        warmed.set()  # kernels ready, clients connected: the first poll is next
        return loop()

    daemon._loop = loop_after_warm_up
    th = threading.Thread(target=daemon.run, kwargs={"install_signals": False}, daemon=True)
    th.start()
    deadline = time.monotonic() + 120

    def wait(consumed: int, checkpoints: int) -> None:
        while daemon.counts["consumed"] < consumed or daemon.counts["checkpoints"] < checkpoints:
            if time.monotonic() > deadline or not th.is_alive():
                raise SystemExit(f"daemon stalled or stopped: {daemon.counts}")
            time.sleep(0.05)

    wait(n, 1)  # the backlog, then a full checkpoint
    more = ids[:600]  # then a few events: a delta checkpoint
    produce_events(bootstrap, topic, [(more, ts[-1] + 1000 + np.zeros(len(more), np.int64),
                                       np.random.default_rng(1).normal(100, 5, (len(more), 1)))])
    wait(n + len(more), 2)
    daemon.stop()
    th.join()
    print(json.dumps({"late": late, "counts": daemon.counts}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
