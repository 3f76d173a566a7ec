"""`streamrnn demo` (what `make demo` runs), end to end at a small size: real broker, daemon
and replay, the alerts of both compared, every process stopped afterwards."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from streamrnn.model import Model

CLI = str(Path(sys.executable).with_name("streamrnn"))


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; the demo reaps its children, so it should not be one.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path):
    work = tmp_path / "demo"
    res = subprocess.run([CLI, "demo", "--streams", "40", "--length", "300", "--epochs", "2",
                          "--speed", "100000", "--workdir", str(work)],
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "daemon alerts vs replay alerts: identical" in out, out
    episodes = re.search(r"alert episodes from the daemon (\d+), from replay (\d+)", out)
    assert episodes and int(episodes.group(1)) == int(episodes.group(2)) > 0, out
    assert "daemon exit code 0" in out, out
    # The live period went through Kafka whole, and the summary evaluated it against the labels.
    live = pq.read_metadata(work / "live.parquet").num_rows
    assert f"events produced {live:,} in" in out, out
    assert re.search(r"event-wise\s+precision [\d.]+\s+recall [\d.]+\s+F1 [\d.]+", out), out
    # The demo trains with a scaler per stream (its streams sit at levels 10-1000).
    model = Model.load(work / "model.safetensors")
    assert model.stream_scaler is not None and len(model.stream_scaler["streams"]) == 40
    # Nothing left running: the daemon's pid is gone and the broker's port is closed.
    pid = int(re.search(r"daemon pid (\d+)", out).group(1))
    broker = re.search(r"Tansu at (\S+),", out).group(1)
    assert not _alive(pid), out
    assert not _port_open(broker), out
