"""recipes/english/train_time.py: a run's training time summed over its train_log.csv."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asr.config import load_config
from asr.train.trainer import Trainer

from .conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes/english/train_time.py"
_spec = importlib.util.spec_from_file_location("train_time", SCRIPT)
train_time = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = train_time  # before running it: its dataclasses look their module up
_spec.loader.exec_module(train_time)

HEADER = "step,epoch,loss,grad_norm,lr,audio_sec_per_sec,audio_hours\n"


def _log(tmp_path: Path, rows: list[tuple[int, float, float]], tail: str = "") -> Path:
    """A run folder whose train_log.csv has rows (step, audio_sec_per_sec, audio_hours)."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    body = "".join(f"{s},0,1.0,1.0,0.001,{speed},{hours}\n" for s, speed, hours in rows)
    (run / "train_log.csv").write_text(HEADER + body + tail)
    return run


def test_each_row_adds_its_audio_over_its_speed(tmp_path):
    # 0.1 h at 20 s/s (18 s), 0.2 h at 10 s/s (72 s), 0.1 h at 40 s/s (9 s)
    run = _log(tmp_path, [(50, 20.0, 0.1), (100, 10.0, 0.3), (150, 40.0, 0.4)])
    t = train_time.training_time(run)
    assert t.seconds == pytest.approx(18 + 72 + 9)
    assert (t.last_step, t.audio_hours, t.median_speed) == (150, 0.4, 20.0)
    cut = train_time.training_time(run / "train_log.csv", to_step=120)  # the file itself, up to a step
    assert cut.seconds == pytest.approx(18 + 72) and cut.last_step == 100 and cut.median_speed == 15.0


def test_a_half_written_last_row_is_left_out(tmp_path):
    run = _log(tmp_path, [(50, 20.0, 0.1)], tail="100,0,1.0\n")
    assert train_time.training_time(run).seconds == pytest.approx(18)


@pytest.mark.parametrize("rows, tail, problem", [
    ([], "", "no rows"),
    ([(50, 20.0, 0.1)], "100,0,1.0,1.0,0.001,fast,0.2\n", "line 3: could not convert"),
    ([(50, 20.0, 0.2), (100, 20.0, 0.1)], "", "line 3: audio_hours 0.1 after 0.2"),
    ([(50, 0.0, 0.1)], "", "line 2: 0.0 audio s/s for 0.1000 audio-hours"),
])
def test_bad_logs_are_a_clear_error_naming_the_file(tmp_path, rows, tail, problem):
    run = _log(tmp_path, rows, tail)
    with pytest.raises(train_time.TrainLogError, match=problem) as e:
        train_time.training_time(run)
    assert str(run / "train_log.csv") in str(e.value)


def test_the_command_line(tmp_path):
    run = _log(tmp_path, [(50, 2.0, 1.0), (100, 4.0, 3.0), (150, 4.0, 4.0)])  # 30 + 30 (+ 15) minutes
    out = subprocess.run([sys.executable, str(SCRIPT), str(run), "--to-step", "100"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.00 h (60 min) of training to step 100, 3.0 audio-hours, a median of 3 audio s/s"
    (run / "train_log.csv").write_text("step,epoch,loss\n1,0,2.0\n")  # a log from before audio_hours
    out = subprocess.run([sys.executable, str(SCRIPT), str(run)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "train_log.csv: no audio_hours or audio_sec_per_sec column" in out.stderr
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "missing")], capture_output=True, text=True)
    assert out.returncode == 2 and "missing: not found (is this an `asr train` folder?)" in out.stderr


@pytest.mark.slow
def test_a_real_runs_time_is_within_its_wall_time(tone_corpus, tmp_path):
    overrides = ["train.max_steps=6", "train.log_every_steps=2", "data.max_batch_seconds=1"]
    trainer = Trainer(load_config(None, TINY_OVERRIDES + overrides), tone_corpus, tone_corpus, tmp_path / "r",
                      progress=False)
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    t = train_time.training_time(tmp_path / "r")
    assert t.last_step == 6 and t.audio_hours == pytest.approx(trainer.audio_seconds / 3600, abs=1e-5)
    assert 0 < t.seconds < wall  # training alone: set-up and evaluation not counted
