"""Crash safety of training: SIGKILL `asr train` at random moments, then run the same command to the end.

    python bench/kill_loop.py [--kills 20] [--steps 60] [--seed 0] [--out DIR] [--json]

A tiny model learns tone 'speech' (tests/conftest.py) and writes a checkpoint at every step. First the
command runs once uninterrupted (the reference, which also times its training). Then the same command,
into another folder, is started again and again and killed with SIGKILL at a random moment of each run:
a quarter of the kills in the second half of its start-up (where resuming and cleaning up happen), the
others at a random time after training began, up to twice the time of each kill's share of the steps
left (timed by the reference), so that kills fall on every kind of moment (writing checkpoints, best/,
logs, evaluating) while the run still moves forward. After every kill, every `step-*` checkpoint folder
left and `best/` must load (asr.checkpoint.load_model_files, load_trainer_state). Finally the same
command runs to completion; it must finish without an error, leave no temporaries, log every step once,
and end with the same weights and dev error rates as the uninterrupted run. Exit status 0 when every
check passes.

All of it is CPU work on one core (the children run with OMP_NUM_THREADS=1; run this under
`taskset -c N` to pin it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from asr.checkpoint import CheckpointError, load_model_files, load_trainer_state  # noqa: E402
from tests.conftest import TINY_OVERRIDES, write_tone_corpus  # noqa: E402

READY = "model: "  # what `asr train` prints once it has resumed and is about to train
DONE = "best dev WER"  # what it prints when training is over


def train_command(corpus: Path, out: Path, steps: int) -> list[str]:
    """The `asr train` command line every run uses: a tiny model, a checkpoint at every step."""
    return [sys.executable, "-m", "asr.cli", "train", "--train", str(corpus), "--dev", str(corpus), "--out", str(out),
            "--no-progress", *TINY_OVERRIDES, "data.max_batch_seconds=1", "train.epochs=1000",
            f"train.max_steps={steps}", "train.checkpoint_every_steps=1", "train.eval_every_steps=5",
            "train.log_every_steps=1", "train.keep_checkpoints=3"]


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def timed_run(command: list[str]) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """Run to the end: (seconds until READY, until DONE, in all; the finished process with its output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            cwd=ROOT)
    ready = trained = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if ready is None and line.startswith(READY):
            ready = time.perf_counter() - start
        if trained is None and line.startswith(DONE):
            trained = time.perf_counter() - start
    stderr = proc.stderr.read()
    proc.wait()
    total = time.perf_counter() - start
    return (ready or total, trained or total, total,
            subprocess.CompletedProcess(command, proc.returncode, "".join(lines), stderr))


class Run:
    """`asr train` started in the background, its output appended to `log`; notes when training begins."""

    def __init__(self, command: list[str], log) -> None:
        self.started = time.perf_counter()
        self.ready_after: float | None = None  # seconds from the start to READY
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=child_env(),
                                     cwd=ROOT)
        self.log = log
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            if self.ready_after is None and line.startswith(READY):
                self.ready_after = time.perf_counter() - self.started

    def wait_until_training(self) -> None:
        while self.ready_after is None and self.proc.poll() is None:
            time.sleep(0.01)

    def kill_at(self, seconds_from_start: float) -> bool:
        """SIGKILL at that moment unless it ends first; True if it was killed."""
        try:
            self.proc.wait(timeout=max(0.0, self.started + seconds_from_start - time.perf_counter()))
            killed = False
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            killed = True
        self.pump.join()
        return killed


def leftovers(out: Path) -> list[Path]:
    """Temporaries and old copies of interrupted atomic writes."""
    return [p for p in out.rglob("*") if (p.name.startswith(".") and ".tmp" in p.name) or p.name.endswith(".old")]


def check_folders(out: Path) -> tuple[int, list[str]]:
    """Load every checkpoint folder and best/: (number checked, problems)."""
    checked, problems = 0, []
    folders = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    for folder in folders + ([out / "best"] if (out / "best").exists() else []):
        checked += 1
        try:
            load_model_files(folder)
            if folder.name != "best":
                load_trainer_state(folder)
        except CheckpointError as e:
            problems.append(str(e))
    return checked, problems


def latest_step(out: Path) -> int:
    steps = [int(p.name[5:]) for p in (out / "checkpoints").glob("step-*")] if (out / "checkpoints").is_dir() else []
    return max(steps, default=0)


def log_column(path: Path, column: str) -> list[str]:
    return [row[column] for row in csv.DictReader(open(path))] if path.exists() else []


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.allclose(x[k].float(), y[k].float(), atol=1e-6) for k in x)


def kill_loop(work: Path, kills: int, steps: int, seed: int) -> dict:
    """Run the whole experiment in `work`; returns the figures and whether each check passed."""
    torch.set_num_threads(1)
    corpus = write_tone_corpus(work / "corpus")
    reference, out = work / "reference", work / "killed"
    t_ready, t_trained, t_total, done = timed_run(train_command(corpus, reference, steps))
    if done.returncode:
        raise SystemExit(f"the uninterrupted run failed:\n{done.stderr}")
    step_seconds = (t_trained - t_ready) / steps
    print(f"uninterrupted run: {t_total:.1f} s ({t_ready:.1f} s to start training, {step_seconds:.2f} s a step)",
          file=sys.stderr)

    rng = random.Random(seed)
    in_startup = set(rng.sample(range(kills), kills // 4))  # the kills that fall in the start-up
    report = {"kills": 0, "kills_in_startup": 0, "finished_before_kill": 0, "failed_runs": 0, "leftovers_seen": 0,
              "checkpoints_checked": 0, "bad_checkpoints": 0, "progress": [], "problems": []}
    with open(work / "killed-runs.log", "w") as log:
        for i in range(kills):
            run = Run(train_command(corpus, out, steps), log)
            if i in in_startup:  # cleaning up after the last kill, resuming
                moment = rng.uniform(0.5, 1.0) * t_ready
                report["kills_in_startup"] += 1
            else:  # into training, on average by an equal share of the steps left for each kill left
                kills_left = sum(1 for j in range(i, kills) if j not in in_startup)
                share = 2 * step_seconds * (steps - latest_step(out)) / kills_left
                run.wait_until_training()
                moment = time.perf_counter() - run.started + rng.uniform(0, share)
            if run.kill_at(moment):
                report["kills"] += 1
            elif run.proc.returncode:
                report["failed_runs"] += 1
                report["problems"].append(f"run {i + 1} exited with status {run.proc.returncode} (see {log.name})")
            else:
                report["finished_before_kill"] += 1
            t_ready = run.ready_after or t_ready  # this machine's start-up time, as of now
            report["leftovers_seen"] += len(leftovers(out)) if out.exists() else 0
            checked, problems = check_folders(out)
            report["checkpoints_checked"] += checked
            report["bad_checkpoints"] += len(problems)
            report["problems"] += [f"after kill {i + 1}: {p}" for p in problems]
            report["progress"].append(latest_step(out))

    _, _, t_final, done = timed_run(train_command(corpus, out, steps))
    report["final_run_seconds"] = round(t_final, 1)
    report["finished"] = done.returncode == 0 and "Traceback" not in done.stderr
    if not report["finished"]:
        report["problems"].append(f"final run: exit {done.returncode}: {done.stderr[-2000:]}")
    checked, problems = check_folders(out)
    report["checkpoints_checked"] += checked
    report["bad_checkpoints"] += len(problems)
    report["problems"] += [f"at the end: {p}" for p in problems]
    report["final_step"] = latest_step(out)
    report["leftovers_at_end"] = [str(p) for p in leftovers(out)]
    report["logs_match_uninterrupted"] = all(
        log_column(out / name, column) == log_column(reference / name, column)
        for name, column in (("train_log.csv", "step"), ("eval_log.csv", "step"), ("eval_log.csv", "dev_wer")))
    last = f"checkpoints/step-{steps:08d}"
    report["same_weights_as_uninterrupted"] = (
        (out / last).exists() and same_weights(out / last, reference / last)
        and same_weights(out / "best", reference / "best"))
    report["ok"] = (report["finished"] and report["bad_checkpoints"] == 0 and report["failed_runs"] == 0
                    and report["final_step"] == steps and not report["leftovers_at_end"]
                    and report["logs_match_uninterrupted"] and report["same_weights_as_uninterrupted"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs before the run to completion")
    parser.add_argument("--steps", type=int, default=60, help="training steps of the whole run")
    parser.add_argument("--seed", type=int, default=0, help="of the kill moments")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="end with the report as one JSON line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kill-loop-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = kill_loop(work, args.kills, args.steps, args.seed)
    print(f"{report['kills']} SIGKILLs ({report['kills_in_startup']} meant for the start-up; "
          f"{report['finished_before_kill']} run(s) ended before their kill, "
          f"{report['failed_runs']} failed); latest checkpoint after each: {report['progress']}")
    print(f"leftovers of interrupted writes seen after kills: {report['leftovers_seen']}, at the end: "
          f"{len(report['leftovers_at_end'])}")
    print(f"checkpoint folders loaded: {report['checkpoints_checked']}, unloadable: {report['bad_checkpoints']}")
    print(f"final run: {'finished' if report['finished'] else 'FAILED'} at step {report['final_step']} in "
          f"{report['final_run_seconds']} s; logs as uninterrupted: {report['logs_match_uninterrupted']}; "
          f"same weights as uninterrupted: {report['same_weights_as_uninterrupted']}")
    for problem in report["problems"]:
        print("problem:", problem)
    if args.json:
        print(json.dumps(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
