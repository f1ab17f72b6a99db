"""The learning curve: dev WER and CER against the audio hours seen, over one or more runs in training order.

    python recipes/english/plot_curve.py RUN [RUN ...] --train-manifest TRAIN.jsonl --out curve.png
    python recipes/english/plot_curve.py RUN [RUN ...] --side-by-side --out curve.png   # runs compared

Each RUN is an `asr train` folder (train_log.csv, eval_log.csv, config.json). A later run is taken to start
from the weights of the earlier one's best evaluation (train.init_from): its x axis continues from the audio
seen up to there. Logs with an audio_hours column give the hours as the trainer counted them (after speed
perturbation); older logs get them from their steps: the fraction of epochs done (epoch ends read off
eval_log.csv when the run evaluated once an epoch, else off train_log.csv's epoch column) times the hours of
the training manifest (--train-manifest: one for every run, or one per run; utterances up to
data.max_duration).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from asr.errors import ASRError
from asr.files import replaced_atomically
from asr.manifest import filter_by_duration, read_manifest
from asr.train.logs import EVAL_LOG, TRAIN_LOG


class CurveError(ASRError, ValueError):
    """A run folder whose logs cannot be placed on the audio-hours axis; names the file."""


@dataclass
class Curve:
    """One run's evaluations on the shared axis."""

    name: str
    start: float  # audio hours seen before this run began (the earlier runs' up to their best)
    steps: list[int]
    hours: list[float]  # audio hours seen at each evaluation, from the first run's start
    wer: list[float]
    cer: list[float]
    exact: bool  # hours counted by the trainer, not derived from the steps

    @property
    def best(self) -> int:
        """The index of the best evaluation (the first lowest WER, as the trainer keeps it)."""
        return min(range(len(self.wer)), key=self.wer.__getitem__)


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV log's complete rows; a missing file or one without a step column is a CurveError."""
    if not path.is_file():
        raise CurveError(f"{path}: not found (is this an `asr train` folder?)")
    with open(path, newline="", errors="replace") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if None not in r.values()]
    if "step" not in (reader.fieldnames or []):
        raise CurveError(f"{path}: no step column")
    return rows


def _number(row: dict[str, str], key: str, path: Path) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        raise CurveError(f"{path}: step {row.get('step')}: {key} {row.get(key)!r} is not a number") from None


def manifest_hours(path: str | Path, max_duration: float | None = None) -> float:
    """Hours of audio in a training manifest, as a run trains on it (utterances up to `max_duration`)."""
    return sum(u.duration for u in filter_by_duration(read_manifest(path), max_duration)) / 3600


def epoch_ends(train_rows: list[dict], eval_rows: list[dict], train_config: dict) -> list[int]:
    """The last step of each finished epoch, as far as the logs tell."""
    if not train_config.get("eval_every_steps"):  # an evaluation at each epoch's end (and at max_steps)
        ends = [int(r["step"]) for r in eval_rows]
        max_steps = train_config.get("max_steps") or math.inf
        return [s for s in ends if s < max_steps]
    logged = [(int(r["step"]), int(r["epoch"])) for r in train_rows]
    ends: list[int] = []
    for (s1, e1), (s2, e2) in zip(logged, logged[1:]):  # an epoch ends between two logged steps
        ends += [round(s1 + (s2 - s1) * (k + 1) / (e2 - e1 + 1)) for k in range(e2 - e1)]
    return ends


def epochs_done(step: int, ends: list[int]) -> float:
    """Epochs (a fraction) done after `step`; past the last known end, the epoch in progress is taken to be
    as long as the one before it."""
    start = 0
    for e, end in enumerate(ends):
        if step <= end:
            return e + (step - start) / (end - start)
        start = end
    if not ends:
        raise ValueError("no epoch has finished")
    length = ends[-1] - (ends[-2] if len(ends) > 1 else 0)
    return len(ends) + (step - ends[-1]) / length


def run_config(run: Path) -> dict:
    """A run's config.json (model, data and train sections)."""
    path = run / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CurveError(f"{path}: cannot read the run's settings ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict) or \
            not isinstance(config.get("train"), dict):
        raise CurveError(f"{path}: no data and train sections")
    return config


def run_curve(run: Path, start: float, train_manifest: str | Path | None) -> Curve:
    """One run's evaluations, `start` hours into the chain; its training manifest is read only when its logs
    have no audio_hours."""
    eval_path = run / EVAL_LOG
    rows = read_rows(eval_path)
    if not rows:
        raise CurveError(f"{eval_path}: no evaluation yet")
    steps = [int(_number(r, "step", eval_path)) for r in rows]
    wer = [_number(r, "dev_wer", eval_path) for r in rows]
    cer = [_number(r, "dev_cer", eval_path) for r in rows]
    logged = [float(r.get("audio_hours") or "nan") for r in rows]
    exact = all(math.isfinite(h) for h in logged)
    if exact:
        seen = logged
    else:
        if train_manifest is None:
            raise CurveError(f"{eval_path}: no audio_hours column; pass --train-manifest to derive the hours "
                             "from the steps")
        config = run_config(run)
        train_hours = manifest_hours(train_manifest, config["data"].get("max_duration"))
        ends = epoch_ends(read_rows(run / TRAIN_LOG), rows, config["train"])
        try:
            seen = [train_hours * epochs_done(s, ends) for s in steps]
        except ValueError:
            raise CurveError(f"{run / TRAIN_LOG}: no epoch has finished, so its length in steps is unknown; "
                             "the hours cannot be derived") from None
    return Curve(run.name, start, steps, [start + h for h in seen], wer, cer, exact)


def learning_curves(runs: list[Path], train_manifests: list[str | Path | None], chained: bool = True) -> list[Curve]:
    """Each run's curve, each continuing the x axis from the best evaluation of the one before (chained), or
    each from zero (runs side by side)."""
    curves: list[Curve] = []
    for run, manifest in zip(runs, train_manifests, strict=True):
        start = curves[-1].hours[curves[-1].best] if curves and chained else 0.0
        curves.append(run_curve(Path(run), start, manifest))
    return curves


def plot(curves: list[Curve], out: Path, title: str = "") -> None:
    """Dev WER (solid) and CER (dashed) against audio hours, the best of each run starred; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, c in enumerate(curves):
        color = f"C{i}"
        derived = "" if c.exact else ", hours from steps"
        ax.plot(c.hours, [100 * w for w in c.wer], "o-", color=color, label=f"{c.name} WER{derived}")
        ax.plot(c.hours, [100 * x for x in c.cer], "s--", color=color, label=f"{c.name} CER")
        ax.plot(c.hours[c.best], 100 * c.wer[c.best], "*", color=color, markersize=15)
        if c.start:
            ax.axvline(c.start, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("audio hours seen")
    ax.set_ylabel("dev error rate (%)")
    ax.set_title(title or "dev WER and CER (greedy); * best of each run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replaced_atomically(out) as (tmp,):
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, in training order")
    parser.add_argument("--side-by-side", action="store_true",
                        help="the runs are not one chain: each starts at 0 hours (settings compared)")
    parser.add_argument("--train-manifest", nargs="+", default=[],
                        help="training manifest(s), for runs whose logs have no audio_hours: one, or one per run")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    manifests = args.train_manifest * len(args.runs) if len(args.train_manifest) == 1 else args.train_manifest
    if manifests and len(manifests) != len(args.runs):
        parser.error(f"--train-manifest: give one, or one per run ({len(args.runs)}), not {len(manifests)}")
    try:
        curves = learning_curves(args.runs, manifests or [None] * len(args.runs), chained=not args.side_by_side)
    except ASRError as e:
        parser.exit(2, f"error: {e}\n")
    for c in curves:
        for step, h, w, x in zip(c.steps, c.hours, c.wer, c.cer):
            print(f"{c.name}\tstep {step}\t{h:.2f} h\tWER {w:.2%}\tCER {x:.2%}")
    plot(curves, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
