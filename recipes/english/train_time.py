"""How long a run trained, from its train_log.csv: the audio each row adds over the speed that row logged.

    python recipes/english/train_time.py RUN [--to-step N]

Each row of an `asr train` folder's train_log.csv holds the audio hours seen so far and the audio seconds per
second over the steps since the row before, so the time between two rows is the audio gained over that speed.
Summed over the rows (up to step N), this counts training alone: not the evaluations, nor the steps redone after
a resume (their rows are dropped when the run resumes), but any pause inside a row's interval (e.g. a run stopped
with SIGSTOP). Prints the time, the steps and audio hours it covers, and the median speed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from asr.errors import ASRError
from asr.train.logs import TRAIN_LOG

COLUMNS = ("step", "audio_hours", "audio_sec_per_sec")


class TrainLogError(ASRError, ValueError):
    """A train_log.csv that cannot be summed; names the file and the line."""


@dataclass
class TrainingTime:
    seconds: float
    last_step: int  # the last row counted
    audio_hours: float  # at that row
    median_speed: float  # audio seconds per second, the median over the rows counted


def training_time(run: str | Path, to_step: int | None = None) -> TrainingTime:
    """The training time of an `asr train` folder (or a train_log.csv) up to `to_step` (None: all rows)."""
    path = Path(run)
    if path.is_dir():
        path = path / TRAIN_LOG
    if not path.is_file():
        raise TrainLogError(f"{path}: not found (is this an `asr train` folder?)")
    with open(path, newline="", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TrainLogError(f"{path}: no {' or '.join(missing)} column (a log from before the trainer "
                                "counted audio hours?)")
        seconds = hours = 0.0
        step, speeds = 0, []
        for line, row in enumerate(reader, 2):
            if None in row.values():  # a half-written last row (a run killed mid-write)
                continue
            try:
                row_step, row_hours = int(row["step"]), float(row["audio_hours"])
                speed = float(row["audio_sec_per_sec"])
            except ValueError as e:
                raise TrainLogError(f"{path}, line {line}: {e}") from None
            if to_step is not None and row_step > to_step:
                break
            if row_hours < hours:
                raise TrainLogError(f"{path}, line {line}: audio_hours {row_hours} after {hours} "
                                    "(rows out of order, or two runs' logs in one file?)")
            if row_hours > hours:
                if speed <= 0:
                    raise TrainLogError(f"{path}, line {line}: {speed} audio s/s for {row_hours - hours:.4f} "
                                        "audio-hours, so its time cannot be told (a long pause?); --to-step "
                                        "can stop before it")
                seconds += (row_hours - hours) * 3600 / speed
            hours, step = row_hours, row_step
            speeds.append(speed)
    if not speeds:
        raise TrainLogError(f"{path}: no rows" + (f" up to step {to_step}" if to_step is not None else ""))
    return TrainingTime(seconds, step, hours, statistics.median(speeds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="an `asr train` folder, or its train_log.csv")
    parser.add_argument("--to-step", type=int, default=None, help="count the rows up to this step only")
    args = parser.parse_args(argv)
    try:
        t = training_time(args.run, args.to_step)
    except TrainLogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{t.seconds / 3600:.2f} h ({t.seconds / 60:.0f} min) of training to step {t.last_step:,}, "
          f"{t.audio_hours:.1f} audio-hours, a median of {t.median_speed:g} audio s/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
