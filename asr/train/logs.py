"""What a training run reports: CSV logs (train_log.csv, eval_log.csv), TensorBoard scalars, tqdm progress."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from tqdm import tqdm

from ..checkpoint import reported_write_errors
from ..files import discard_dir, replaced_atomically

log = logging.getLogger(__name__)
TRAIN_LOG, EVAL_LOG, TENSORBOARD = "train_log.csv", "eval_log.csv", "tensorboard"  # under OUT
LOG_NAMES = (TRAIN_LOG, EVAL_LOG, TENSORBOARD)


def append_row(path: Path, row: dict) -> None:
    """Append `row` to a CSV file, with a header line first when the file is new (or empty). A file begun
    with other columns (an older version's run, resumed) keeps them: keys it lacks are left out."""
    with reported_write_errors(path, "log"):
        fields = _header(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields or list(row), extrasaction="ignore")
            if not fields:
                writer.writeheader()
            writer.writerow(row)


def _header(path: Path) -> list[str]:
    """The column names of a CSV log; [] when it does not exist or is empty."""
    if not path.exists():
        return []
    with open(path, newline="", errors="replace") as f:
        return next(csv.reader(f), [])


def trim_logs(out: Path, step: int) -> None:
    """Drop the CSV log rows past `step` (written after the checkpoint we resume from, by a run that was then
    killed) and half-written ones; each log is rewritten atomically."""
    for name in (TRAIN_LOG, EVAL_LOG):
        path = out / name
        if not path.exists():
            continue
        with open(path, newline="", errors="replace") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = reader.fieldnames
        if not fields or "step" not in fields:  # not even a whole header: nothing to keep
            path.unlink()
            continue
        keep = [r for r in rows if None not in r and None not in r.values()
                and r["step"].isdigit() and int(r["step"]) <= step]
        if len(keep) == len(rows):
            continue
        with reported_write_errors(path, "log"), replaced_atomically(path) as (tmp,):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(keep)
        log.info("%s: dropped %d row(s) past step %d", path, len(rows) - len(keep), step)


def discard_logs(out: Path) -> None:
    """Delete the logs of the run in `out` (starting afresh)."""
    if (out / TENSORBOARD).is_dir():
        discard_dir(out / TENSORBOARD)
    for name in (TRAIN_LOG, EVAL_LOG):
        (out / name).unlink(missing_ok=True)


class RunLogs:
    """Rank 0's record of a run in `out`: each row in its CSV log and as TensorBoard scalars."""

    def __init__(self, out: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # slow to import

        self.out = out
        # resuming: TensorBoard events past the checkpoint's step are dropped
        self.writer = SummaryWriter(str(out / TENSORBOARD), purge_step=start_step or None)

    def train(self, step: int, epoch: int, metrics: dict) -> None:
        append_row(self.out / TRAIN_LOG, {"step": step, "epoch": epoch, **metrics})
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def eval(self, result: dict) -> None:
        """`result`: step, epoch, dev_loss, dev_wer, dev_cer (Trainer.evaluate)."""
        append_row(self.out / EVAL_LOG, result)
        for k in ("dev_loss", "dev_wer", "dev_cer"):
            self.writer.add_scalar(f"dev/{k[4:]}", result[k], result["step"])

    def close(self) -> None:
        self.writer.close()


class IntervalMeans:
    """The training metrics of the steps since the last logged row, for that row: loss (and any other
    per-utterance term) weighted by each step's utterances, gradient norm averaged over steps, speed as audio
    seconds over wall seconds. One step's loss alone swings with what its batch held (digits or long sentences)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.utterances = self.steps = 0
        self.audio_seconds = self.wall_seconds = self.grad_norm = 0.0
        self.sums: dict[str, float] = {}

    def add(self, metrics: dict, utterances: int, audio_seconds: float, wall_seconds: float) -> None:
        """One step's metrics (`loss`, `grad_norm`, optional `consistency`, `intermediate`, `word_pieces`) over its
        `utterances`; a step that had none (all unreadable) adds only its time."""
        if utterances:
            for key in ("loss", "consistency", "intermediate", "word_pieces"):
                if key in metrics:
                    self.sums[key] = self.sums.get(key, 0.0) + metrics[key] * utterances
            self.utterances += utterances
            self.steps += 1
            self.grad_norm += metrics["grad_norm"]
        self.audio_seconds += audio_seconds
        self.wall_seconds += wall_seconds

    def means(self) -> dict:
        """The interval's loss (and consistency, intermediate, word_pieces), grad_norm and audio_sec_per_sec,
        rounded."""
        means = {key: round(total / max(self.utterances, 1), 4) for key, total in self.sums.items()}
        means["grad_norm"] = round(self.grad_norm / max(self.steps, 1), 3)
        means["audio_sec_per_sec"] = round(self.audio_seconds / max(self.wall_seconds, 1e-9), 1)
        return means


def epoch_progress(epoch: int, epochs: int, steps: int, done: int, enabled: bool) -> tqdm:
    """The progress bar of one epoch of `steps` optimiser steps, `done` of them already taken (resuming)."""
    return tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{epochs}", disable=not enabled,
                dynamic_ncols=True)


def show_step(bar: tqdm, metrics: dict) -> None:
    """Advance the bar by one step and show the loss and speed since the last logged row, and the learning rate."""
    bar.update()
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                    speed=f"{metrics['audio_sec_per_sec']:.0f}x")


def print_line(message: str) -> None:
    """Print a line of text without breaking a progress bar."""
    tqdm.write(message)
