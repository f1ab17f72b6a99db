"""The audio-hours count in the training logs, and recipes/english/plot_curve.py's learning curve."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from asr.config import load_config
from asr.train.logs import append_row
from asr.train.trainer import Trainer

from .conftest import TINY_OVERRIDES, after_step

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("plot_curve", ROOT / "recipes/english/plot_curve.py")
plot_curve = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = plot_curve  # before running it: its dataclasses look their module up
_spec.loader.exec_module(plot_curve)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fake_run(folder: Path, evals: list[tuple], train: list[tuple], eval_every_steps: int = 0) -> Path:
    """A run folder: eval rows (step, wer[, audio_hours]) and train rows (step, epoch)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"data": {"max_duration": 20.0},
                                                    "train": {"eval_every_steps": eval_every_steps, "max_steps": 0}}))
    rows = [{"step": e[0], "epoch": 0, "dev_loss": 1.0, "dev_wer": e[1], "dev_cer": e[1] / 2}
            | ({"audio_hours": e[2]} if len(e) > 2 else {}) for e in evals]
    _write_csv(folder / "eval_log.csv", rows)
    _write_csv(folder / "train_log.csv", [{"step": s, "epoch": ep, "loss": 1.0, "grad_norm": 1.0, "lr": 1e-3,
                                          "audio_sec_per_sec": 20.0} for s, ep in train])
    return folder


@pytest.fixture
def one_hour_manifest(tmp_path) -> Path:
    """360 utterances of 10 s (one hour) and one longer than the runs' data.max_duration (not trained on)."""
    lines = [json.dumps({"audio_filepath": f"u{i}.wav", "duration": 10.0, "text": "a"}) for i in range(360)]
    lines.append(json.dumps({"audio_filepath": "long.wav", "duration": 30.0, "text": "a"}))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_later_run_continues_the_axis_from_the_earlier_runs_best(tmp_path, one_hour_manifest):
    # an older run: no audio_hours, one evaluation at each epoch's end (epochs of 10, 15 and 15 steps)
    old = _fake_run(tmp_path / "old", [(10, 0.9), (25, 0.7), (40, 0.8)], [(1, 0), (10, 0), (20, 1), (30, 2)])
    new = _fake_run(tmp_path / "new", [(5, 0.75, 0.5), (10, 0.6, 1.0)], [(1, 0), (10, 0)])
    first, second = plot_curve.learning_curves([old, new], [one_hour_manifest, None])
    assert first.hours == pytest.approx([1.0, 2.0, 3.0]) and not first.exact
    assert first.best == 1
    assert second.exact and second.start == pytest.approx(2.0)  # the best of the first run, not its end
    assert second.hours == pytest.approx([2.5, 3.0])

    _, beside = plot_curve.learning_curves([old, new], [one_hour_manifest, None], chained=False)
    assert beside.start == 0 and beside.hours == pytest.approx([0.5, 1.0])  # runs compared: each from zero

    out = tmp_path / "curve.png"
    pytest.importorskip("matplotlib")
    plot_curve.main([str(old), str(new), "--train-manifest", str(one_hour_manifest), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_curve.main([str(old), str(new), "--train-manifest", str(one_hour_manifest), "--out", str(out),
                     "--side-by-side"])


def test_epoch_ends_from_the_train_log_when_evaluating_by_steps(tmp_path, one_hour_manifest):
    run = _fake_run(tmp_path / "r", [(10, 0.9), (18, 0.8), (20, 0.7)], [(1, 0), (8, 0), (12, 1), (16, 1), (20, 2)],
                    eval_every_steps=5)
    (curve,) = plot_curve.learning_curves([run], [one_hour_manifest])
    assert curve.hours == pytest.approx([1.0, 2.0, 2.25])  # ends midway: 10 and 18; the third epoch as long


def test_epochs_done_extrapolates_the_epoch_in_progress():
    assert plot_curve.epochs_done(5, [10, 25]) == pytest.approx(0.5)
    assert plot_curve.epochs_done(31, [10, 25]) == pytest.approx(2.4)
    with pytest.raises(ValueError):
        plot_curve.epochs_done(5, [])


def test_old_logs_without_a_manifest_are_a_clear_error(tmp_path):
    old = _fake_run(tmp_path / "old", [(10, 0.9)], [(1, 0)])
    with pytest.raises(plot_curve.CurveError, match="eval_log.csv: no audio_hours.*--train-manifest"):
        plot_curve.learning_curves([old], [None])
    out = subprocess.run([sys.executable, str(ROOT / "recipes/english/plot_curve.py"), str(old), "--out",
                          str(tmp_path / "c.png")], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--train-manifest" in out.stderr
    with pytest.raises(plot_curve.CurveError, match="missing/eval_log.csv: not found"):
        plot_curve.learning_curves([tmp_path / "missing"], [None])


def test_a_log_begun_without_audio_hours_keeps_its_columns(tmp_path):
    log = tmp_path / "train_log.csv"
    log.write_text("step,epoch,loss\n1,0,2.0\n")
    append_row(log, {"step": 2, "epoch": 0, "loss": 1.5, "audio_hours": 0.1})
    assert log.read_text() == "step,epoch,loss\n1,0,2.0\n2,0,1.5\n"


def _trainer(corpus: Path, out: Path) -> Trainer:
    overrides = ["train.max_steps=7", "train.checkpoint_every_steps=3", "train.eval_every_steps=2",
                 "train.log_every_steps=1", "data.max_batch_seconds=1"]
    return Trainer(load_config(None, TINY_OVERRIDES + overrides), corpus, corpus, out, progress=False)


def _hours(log: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["audio_hours"])) for r in csv.DictReader(open(log))]


class Crash(Exception):
    pass


def _crash() -> None:
    raise Crash()


@pytest.mark.slow
def test_audio_hours_count_every_step_and_survive_a_resume(tone_corpus, tmp_path):
    straight = _trainer(tone_corpus, tmp_path / "straight")
    straight.fit()
    hours = _hours(tmp_path / "straight" / "train_log.csv")
    assert [s for s, _ in hours] == list(range(1, 8))
    assert all(0 < a < b for (_, a), (_, b) in zip(hours, hours[1:]))  # cumulative
    assert hours[-1][1] == pytest.approx(straight.audio_seconds / 3600, abs=1e-5)
    evals = dict(_hours(tmp_path / "straight" / "eval_log.csv"))
    assert evals == {s: h for s, h in hours if s in evals} and sorted(evals) == [2, 4, 6, 7]

    with pytest.raises(Crash):  # killed after step 5: resumes from the checkpoint of step 3
        after_step(_trainer(tone_corpus, tmp_path / "killed"), 5, _crash).fit()
    _trainer(tone_corpus, tmp_path / "killed").fit()
    for log in ("train_log.csv", "eval_log.csv"):
        assert _hours(tmp_path / "killed" / log) == _hours(tmp_path / "straight" / log), log
