"""The ``streamrnn`` command line: each command parses its arguments and calls the library."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from streamrnn.errors import StreamrnnError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Streaming anomaly detection with recurrent networks compiled by Numba.")
console = Console()


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(code=2)


@app.command()
def inspect(model: Path = typer.Argument(..., help="A streamrnn model file (.safetensors).")) -> None:
    """Print a model file's architecture and metadata as JSON."""
    from streamrnn.model import Model

    try:
        m = Model.load(model)
    except StreamrnnError as exc:
        _fail(exc)
    info = m.metadata()
    info["state_floats_per_stream"] = m.state_width
    info["flops_per_event"] = m.flops_per_event()
    console.print_json(json.dumps(info))


def _persistence_gru(n_features: int = 1):
    """A GRU whose head reproduces its input: it predicts 'next = last' (a persistence
    forecaster), the honest baseline until a trained model is available."""
    from streamrnn.model import Model

    h = 8
    layer = {"w_ih": np.zeros((3 * h, 1)), "w_hh": np.zeros((3 * h, h)),
             "b_ih": np.zeros(3 * h), "b_hh": np.zeros(3 * h)}
    layer["b_ih"][h:2 * h] = -30.0  # update gate closed: h' = n
    layer["w_ih"][2 * h:, 0] = 0.05  # n = tanh(0.05 x) ~ 0.05 x for scaled |x| < 4
    head_w = np.full((1, h), 1.0 / (0.05 * h))
    return Model(cell="gru", layers=[layer], head_weight=head_w, head_bias=np.zeros(1),
                 name="persistence-demo", feature_names=["cpu"])


@app.command()
def demo(streams: int = typer.Option(500, help="Number of synthetic streams."),
         length: int = typer.Option(300, help="Events per stream."),
         batch: int = typer.Option(5000, help="Events per micro-batch.")) -> None:
    """Run the scoring engine end to end on a synthetic fleet with injected spikes.

    Each stream gets its own scaler-free state; scores are errors normalised per stream, so
    one threshold fits streams of any level and scale.
    """
    from streamrnn.detector import Detector
    from streamrnn.synthetic import spiky_fleet

    fleet = spiky_fleet(n_streams=streams, length=length, seed=7)
    model = _persistence_gru()
    # A global scaler fitted on the first tenth of the history (never the future it scores).
    history = fleet.values[: len(fleet.values) // 10]
    model.scaler_mean[:] = history.mean(axis=0)
    model.scaler_scale[:] = history.std(axis=0)
    console.print(f"[bold]streamrnn demo[/bold]: {streams} streams x {length} events, "
                  f"GRU persistence model, micro-batches of {batch}")
    Detector(model).process(["warm-up"], fleet.values[:1], fleet.timestamps[:1])  # compile kernels now
    det = Detector(model, threshold=5.0, warmup=20)
    alerts = np.zeros(len(fleet.stream_ids), bool)
    t0 = time.perf_counter()
    for a in range(0, len(fleet.stream_ids), batch):
        res = det.process(fleet.stream_ids[a:a + batch], fleet.values[a:a + batch], fleet.timestamps[a:a + batch])
        alerts[a:a + batch] = res.alert
        for i in np.flatnonzero(res.alert)[:3] if a < 20 * batch else []:
            console.print(f"  alert {res.stream_ids[i]} ts={int(res.timestamps[i])} "
                          f"value={res.values[i, 0]:.1f} predicted={res.prediction[i, 0]:.1f} score={res.score[i]:.1f}")
    dt = time.perf_counter() - t0
    truth = fleet.is_anomaly
    tp = int((alerts & truth).sum())
    precision = tp / max(int(alerts.sum()), 1)
    recall = tp / max(int(truth.sum()), 1)
    console.print(f"events {len(truth)}  streams held {len(det.table)}  "
                  f"throughput {len(truth) / dt:,.0f} events/s")
    console.print(f"alerts {int(alerts.sum())}  injected spikes {int(truth.sum())}  "
                  f"point-wise precision {precision:.2f} recall {recall:.2f}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
