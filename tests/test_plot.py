"""streamrnn.plot: PNGs per stream and small multiples, with alerts and labels drawn."""

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamrnn.errors import StreamrnnError
from streamrnn.plot import ALERT_COLOUR, plot_scores, rolling_std, safe_filename


def write_scores(path, alert_stream=None):
    rng = np.random.default_rng(0)
    n, names = 200, ["host-1/cpu", "host-2/cpu", "db:3"]
    rows = {"stream": [], "ts": [], "cpu": [], "pred_cpu": [], "score": [], "alert": []}
    for k, s in enumerate(names):
        x = 50 + 10 * np.sin(np.arange(n) / 10) + rng.standard_normal(n)
        alert = np.zeros(n, bool)
        if s == alert_stream:
            alert[120:130] = True
        rows["stream"] += [s] * n
        rows["ts"] += list(1_700_000_000_000 + np.arange(n) * 60_000)
        rows["cpu"] += list(x)
        rows["pred_cpu"] += list(np.r_[np.nan, x[:-1]])
        rows["score"] += list(rng.random(n))
        rows["alert"] += list(alert)
    table = pa.table(rows).set_column(1, "ts", pa.array(np.array(rows["ts"], np.int64)).cast(pa.timestamp("ms", tz="UTC")))
    pq.write_table(table, path)


def red_pixels(png) -> int:
    img = mpimg.imread(png)[..., :3]
    r, g, b = (int(ALERT_COLOUR[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return int((np.abs(img - [r, g, b]).sum(axis=-1) < 0.05).sum())


def test_plot_writes_a_png_per_stream_and_small_multiples(tmp_path):
    write_scores(tmp_path / "s.parquet", alert_stream="db:3")
    (tmp_path / "labels.csv").write_text("stream,start,end\nhost-1/cpu,1700000600000,1700001200000\n")
    paths = plot_scores(tmp_path / "s.parquet", tmp_path / "png", labels=tmp_path / "labels.csv")
    names = sorted(p.name for p in paths)
    assert names == ["db_3.png", "host-1_cpu.png", "host-2_cpu.png", "small_multiples.png"]
    assert paths[0].name == "db_3.png"  # the stream with alerts comes first
    for p in paths:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 0.01
    # Alert markers are drawn in the alert colour on the alerting stream only.
    assert red_pixels(tmp_path / "png" / "db_3.png") > 20
    assert red_pixels(tmp_path / "png" / "host-2_cpu.png") == 0


def test_plot_selected_streams_and_errors(tmp_path):
    write_scores(tmp_path / "s.parquet")
    paths = plot_scores(tmp_path / "s.parquet", tmp_path / "one", streams=["host-2/cpu"])
    assert [p.name for p in paths] == ["host-2_cpu.png", "small_multiples.png"]
    with pytest.raises(StreamrnnError, match="not in"):
        plot_scores(tmp_path / "s.parquet", tmp_path / "x", streams=["nope"])
    with pytest.raises(StreamrnnError, match="no such file"):
        plot_scores(tmp_path / "missing.parquet", tmp_path / "x")


def test_rolling_std_and_file_names():
    x = np.array([1.0, np.nan, 3.0, 5.0, 7.0])
    got = rolling_std(x, 3)
    assert np.isnan(got[0]) and np.isnan(got[1])
    assert got[2] == pytest.approx(np.std([1.0, 3.0]))
    assert got[4] == pytest.approx(np.std([3.0, 5.0, 7.0]))
    assert safe_filename("a/b c:d") == "a_b_c_d" and safe_filename("..") == "stream"


def test_an_interrupted_plot_leaves_the_old_png_and_no_partial(tmp_path, monkeypatch):
    import matplotlib.figure

    write_scores(tmp_path / "s.parquet", alert_stream="db:3")
    paths = plot_scores(tmp_path / "s.parquet", tmp_path / "png", streams=["db:3"])
    before = {p.name: p.read_bytes() for p in paths}

    def half_then_interrupt(fig, target, **kwargs):
        with open(target, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        plot_scores(tmp_path / "s.parquet", tmp_path / "png", streams=["db:3"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "png").iterdir()} == before

    def disk_full(fig, target, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    with pytest.raises(StreamrnnError, match="cannot write .*db_3.png: No space left on device"):
        plot_scores(tmp_path / "s.parquet", tmp_path / "png", streams=["db:3"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "png").iterdir()} == before
