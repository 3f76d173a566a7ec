"""streamrnn.evaluate against hand-computed precision, recall, delay, AUC-PR and NAB scores."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamrnn.evaluate import (EvaluationError, Labels, Scores, alert_episodes, average_precision,
                                evaluate, evaluate_files, load_labels, nab_stream_score,
                                nab_windows_from_points, probationary_length, scaled_sigmoid)
from streamrnn.evaluate import NAB_PROFILES

STD = NAB_PROFILES["standard"]


def sigma(y):
    """NAB's scaled sigmoid written independently: 2*sigmoid(-5y) - 1 == -tanh(5y/2)."""
    return -1.0 if y >= 3 else -math.tanh(2.5 * y)


def two_streams() -> Scores:
    """Streams A and B, 20 events each one second apart, interleaved as a replay writes them."""
    alert_a = np.zeros(20, bool)
    alert_a[[3, 4, 5, 6, 12]] = True
    alert_b = np.zeros(20, bool)
    alert_b[[5, 11]] = True
    ts = np.arange(20, dtype=np.int64) * 1000
    stream = np.array(["A", "B"] * 20, object)
    return Scores(stream, np.repeat(ts, 2), np.linspace(0, 1, 40),
                  np.column_stack([alert_a, alert_b]).ravel())


def test_scaled_sigmoid_matches_the_published_values():
    assert scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert scaled_sigmoid(0.0) == 0.0
    assert scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    assert scaled_sigmoid(3.0) == -1.0


def test_event_point_and_delay_metrics_by_hand():
    labels = Labels.windows(["A", "A", "B", "B"], [5000, 15000, 4000, 10000], [9000, 16000, 5000, 10000],
                            type=["spike", "spike", "level_shift", "level_shift"])
    ev = evaluate(two_streams(), labels, probation_fraction=0.0)
    # A: episode [3..6] overlaps window [5..9] (delay 0: already open), [12] is false; [15..16] missed.
    # B: episode [5] detects window [4..5] one event late, [11] is false; window [10] missed.
    assert (ev.event["windows"], ev.event["detected"]) == (4, 2)
    assert (ev.event["episodes"], ev.event["true_episodes"]) == (4, 2)
    assert ev.event["precision"] == 0.5 and ev.event["recall"] == 0.5 and ev.event["f1"] == 0.5
    assert ev.delay["mean_ms"] == 500.0 and ev.delay["mean_events"] == 0.5
    # Point-wise: labelled A 5..9, 15, 16 and B 4, 5, 10 (10 events); alerted A 3, 4, 5, 6, 12 and
    # B 5, 11 (7 events); both: A 5, 6 and B 5.
    assert (ev.point["tp"], ev.point["fp"], ev.point["fn"]) == (3, 4, 7)
    assert ev.point["precision"] == pytest.approx(3 / 7) and ev.point["recall"] == pytest.approx(0.3)
    assert ev.per_type["spike"]["recall"] == 0.5 and ev.per_type["spike"]["precision"] == 0.5
    assert ev.per_type["level_shift"]["detected"] == 1
    assert ev.n_streams == 2 and ev.n_events == 40 and ev.unmatched_labels == 0


def test_point_labels_make_incidents_of_consecutive_points():
    scores = two_streams()
    points = Labels.points(["B", "B", "B", "C"], [4000, 5000, 10000, 0])
    ev = evaluate(scores, points, probation_fraction=0.0)
    windows = evaluate(scores, Labels.windows(["B", "B"], [4000, 10000], [5000, 10000]), probation_fraction=0.0)
    assert ev.event == windows.event
    assert ev.point == windows.point
    assert ev.unmatched_labels == 1  # stream C was never scored


def test_nab_score_of_one_stream_by_hand():
    # 20 events, window [5..9]; detections at 2 (before any window), 6 (in it), 15 (after it).
    s = nab_stream_score(20, np.array([5]), np.array([9]), np.array([2, 6, 15]), STD, probation=0)
    tp = sigma(-(9 - 6 + 1) / 5) / sigma(-1.0)
    fp_after = 0.11 * sigma((15 - 9) / (5 - 1))
    fp_before = -0.11
    assert s.score == pytest.approx(tp + fp_after + fp_before, abs=1e-12)
    assert (s.null, s.perfect) == (-1.0, pytest.approx(1.0))
    assert s.normalised == pytest.approx(100 * (tp + fp_after + fp_before + 1) / 2)
    low_fn = nab_stream_score(20, np.array([5]), np.array([9]), np.array([15]), NAB_PROFILES["reward_low_FN_rate"], 0)
    assert low_fn.score == pytest.approx(-2.0 + 0.11 * sigma(1.5))
    low_fp = nab_stream_score(20, np.array([5]), np.array([9]), np.array([2]), NAB_PROFILES["reward_low_FP_rate"], 0)
    assert low_fp.score == pytest.approx(-1.0 - 0.22)


def test_nab_only_the_first_detection_in_a_window_counts_and_probation_is_skipped():
    one = nab_stream_score(40, np.array([20]), np.array([29]), np.array([21]), STD, probation=0)
    two = nab_stream_score(40, np.array([20]), np.array([29]), np.array([21, 25]), STD, probation=0)
    assert one.score == two.score == pytest.approx(sigma(-0.9) / sigma(-1.0))
    # A detection inside the probationary period is ignored; a window wholly inside it too.
    p = nab_stream_score(40, np.array([2, 20]), np.array([5, 29]), np.array([3, 10]), STD, probation=8)
    assert p.null == -1.0 and p.score == pytest.approx(-1.0 + 0.11 * sigma((10 - 5) / 3))


def test_nab_windows_from_points_follow_the_labeler_rule():
    assert probationary_length(100) == 15 and probationary_length(100_000) == 750
    s, e = nab_windows_from_points(100, np.array([10, 50]))  # int(0.1*100/2) = 5 wide: +-2
    assert s.tolist() == [8, 48] and e.tolist() == [12, 52]
    s, e = nab_windows_from_points(100, np.array([1, 3]))  # clipped at 0 and merged
    assert s.tolist() == [0] and e.tolist() == [5]


def test_nab_normalisation_sums_streams_like_nab_files():
    scores = two_streams()
    labels = Labels.windows(["A", "B"], [5000, 4000], [9000, 5000])
    ev = evaluate(scores, labels, probation_fraction=0.0)
    a = nab_stream_score(20, np.array([5]), np.array([9]), np.array([3, 12]), STD, 0)
    b = nab_stream_score(20, np.array([4]), np.array([5]), np.array([5, 11]), STD, 0)
    expect = 100 * (a.score + b.score - a.null - b.null) / (a.perfect + b.perfect - a.null - b.null)
    assert ev.nab["standard"] == pytest.approx(expect)
    assert ev.nab_raw["standard"] == pytest.approx(a.score + b.score)
    # An episode already open when the window starts is an FP opening, the window a miss.
    assert a.score == pytest.approx(-1.0 - 0.11 + 0.11 * sigma((12 - 9) / 4))


def test_average_precision_by_hand_and_against_brute_force():
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(5 / 6)
    rng = np.random.default_rng(3)
    s = rng.integers(0, 12, 200).astype(float)
    s[:5] = np.nan
    y = rng.random(200) < 0.3
    ranked = np.where(np.isnan(s), -np.inf, s)
    total, prev_recall = 0.0, 0.0
    for thr in sorted(set(ranked.tolist()), reverse=True):
        hit = ranked >= thr
        recall = (hit & y).sum() / y.sum()
        total += (recall - prev_recall) * (hit & y).sum() / hit.sum()
        prev_recall = recall
    assert average_precision(s, y) == pytest.approx(total)


def test_alert_episodes():
    s, e = alert_episodes(np.array([1, 1, 0, 1, 0, 0, 1], bool))
    assert s.tolist() == [0, 3, 6] and e.tolist() == [1, 3, 6]


def test_files_parquet_scores_and_csv_labels_with_iso_times(tmp_path):
    sc = two_streams()
    pq.write_table(pa.table({"stream": sc.stream.astype(str), "ts": pa.array(sc.ts, pa.timestamp("ms", tz="UTC")),
                             "x": np.zeros(40), "pred_x": np.zeros(40), "score": sc.score, "alert": sc.alert}),
                   tmp_path / "scores.parquet")
    (tmp_path / "labels.csv").write_text("stream,start,end,type\n"
                                         "A,1970-01-01T00:00:05Z,1970-01-01T00:00:09Z,spike\n"
                                         "B,1970-01-01T00:00:04Z,1970-01-01T00:00:05Z,spike\n")
    ev = evaluate_files(tmp_path / "scores.parquet", tmp_path / "labels.csv", probation_fraction=0.0)
    assert (ev.event["windows"], ev.event["detected"], ev.event["true_episodes"]) == (2, 2, 2)


def test_bad_label_files_give_one_clear_error(tmp_path):
    (tmp_path / "bad.csv").write_text("stream,when\nA,1\n")
    with pytest.raises(EvaluationError, match="stream\\+ts"):
        load_labels(tmp_path / "bad.csv")
    with pytest.raises(EvaluationError, match="no such file"):
        load_labels(tmp_path / "missing.parquet")
    (tmp_path / "s.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(EvaluationError, match="cannot read"):
        evaluate_files(tmp_path / "s.parquet", tmp_path / "bad.csv")


def test_a_scores_file_is_refused_as_labels_and_swapped_files_are_named(tmp_path):
    # replay's output given as --labels made every scored event a label point
    sc = two_streams()
    pq.write_table(pa.table({"stream": sc.stream.astype(str), "ts": sc.ts, "x": np.zeros(40), "pred_x": np.zeros(40),
                             "score": sc.score, "alert": sc.alert}), tmp_path / "scores.parquet")
    (tmp_path / "labels.csv").write_text("stream,ts\nA,5000\n")
    with pytest.raises(EvaluationError, match=r"scores.parquet is a SCORES file \(replay's output"):
        evaluate_files(tmp_path / "scores.parquet", tmp_path / "scores.parquet")
    with pytest.raises(EvaluationError, match=r"wrong way round: \S*scores.parquet is the SCORES file"):
        evaluate_files(tmp_path / "labels.csv", tmp_path / "scores.parquet")
    # scores joined with a per-event flag column are labels (only the flagged rows)
    flagged = pa.table({"stream": ["A"], "ts": [5000], "score": [0.5], "alert": [True], "label": [1]})
    pq.write_table(flagged, tmp_path / "flagged.parquet")
    assert load_labels(tmp_path / "flagged.parquet").stream.tolist() == ["A"]


def test_f1_is_zero_when_nothing_alerts_and_undefined_without_labels():
    quiet = two_streams()
    quiet.alert[:] = False
    ev = evaluate(quiet, Labels.windows(["A"], [5000], [9000]), probation_fraction=0.0)
    assert ev.event["recall"] == 0.0 and ev.event["f1"] == 0.0 and math.isnan(ev.event["precision"])
    assert ev.nab["standard"] == 0.0  # the null detector scores 0 after normalisation
    ev = evaluate(two_streams(), Labels.windows([], [], []), probation_fraction=0.0)
    assert math.isnan(ev.event["f1"]) and ev.event["episodes"] == 4 and math.isnan(ev.auc_pr)


def test_per_type_ignores_episodes_on_another_types_window():
    # Stream A: a spike window [5..9] (hit by episode [3..6]) and a drift window [12..13]
    # (hit by episode [12]); for "spike" the drift episode is neither right nor wrong.
    labels = Labels.windows(["A", "A"], [5000, 12000], [9000, 13000], type=["spike", "drift"])
    ev = evaluate(two_streams(), labels, probation_fraction=0.0)
    assert (ev.per_type["spike"]["episodes"], ev.per_type["spike"]["true_episodes"]) == (1, 1)
    assert (ev.per_type["drift"]["episodes"], ev.per_type["drift"]["true_episodes"]) == (1, 1)
    assert (ev.event["episodes"], ev.event["true_episodes"]) == (4, 2)  # B has no labels: both false
    assert ev.per_type["spike"]["f1"] == 1.0
