"""User mistakes through the command line: one clear line, exit code 2, no traceback, and no
input file replaced or output left half-written."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from streamrnn.cli import app
from streamrnn.model import Model

S, T = 4, 60
T0 = 1_767_225_600_000

runner = CliRunner()


def invoke(*args) -> tuple[int, str]:
    """Exit code and output (whitespace collapsed: rich wraps long lines); fails on a traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, re.sub(r"\s+", " ", result.output)


def fleet_table(n_streams: int = S, length: int = T) -> pa.Table:
    rng = np.random.default_rng(0)
    ids = np.repeat([f"s{i}" for i in range(n_streams)], length)
    step = np.tile(np.arange(length), n_streams)
    value = np.sin(step / 5.0) + np.repeat(np.arange(n_streams), length) + 0.05 * rng.standard_normal(len(step))
    return pa.table({"stream": ids, "ts": pa.array(T0 + step * 60_000).cast(pa.timestamp("ms", tz="UTC")),
                     "value": value})


@pytest.fixture
def data(tmp_path):
    pq.write_table(fleet_table(), tmp_path / "live.parquet")
    Model.random("gru", n_features=1, hidden=[8], seed=3, feature_names=["value"]).save(tmp_path / "m.safetensors")
    return tmp_path


def replay_args(d, *extra):
    return ["replay", d / "live.parquet", "--model", d / "m.safetensors", "--no-progress", *extra]


def test_error_messages_keep_their_brackets(data):
    # rich took "[scoring]" for a markup tag and printed "error:  threshold must ..."
    code, out = invoke(*replay_args(data, "--out", data / "s.parquet", "--threshold", "5"))
    assert code == 2 and "error: [scoring] threshold must be a score in [0, 1]; got 5.0" in out
