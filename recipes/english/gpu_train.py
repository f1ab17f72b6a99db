"""The GPU step of `gpu.sh train`: train the English model on a pack (gpu_pack.py), score it on the pack's dev
set and put it, with its logs and results, into OUT: at most 8 files of at most 16 MiB each.

    python recipes/english/gpu_train.py --pack PACK --out OUT --exp EXP [key=value ...]

EXP holds the run (checkpoints, resumed if there); OUT gets model.json and model.safetensors with fp16
weights, as the package ships them (a model folder: `asr transcribe --model OUT`), config.json,
train_log.csv, eval_log.csv, results.json and, with matplotlib, learning_curve.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from gpu_pack import MIB, PackError, read_pack

from asr.config import load_config
from asr.device import describe_machine
from asr.errors import ASRError
from asr.files import replaced_atomically, write_text_atomically
from asr.serve.evaluate import evaluate_manifest
from asr.serve.packaging import ship_model
from asr.serve.transcribe import load_model
from asr.train.logs import EVAL_LOG, TRAIN_LOG
from asr.train.trainer import Trainer

HERE = Path(__file__).resolve().parent
MAX_FILES, MAX_FILE_MIB = 8, 16  # what a device run's $OUT brings back
COPIED = ("fp16/model.json", "fp16/model.safetensors", "config.json", TRAIN_LOG, EVAL_LOG)


def check_folder(folder: Path, max_files: int = MAX_FILES, max_mib: float = MAX_FILE_MIB) -> list[Path]:
    """The files under `folder`; a PackError when there are more than `max_files` or one is over `max_mib`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    big = [f"{p.name} ({p.stat().st_size / MIB:.1f} MiB)" for p in files if p.stat().st_size > max_mib * MIB]
    if len(files) > max_files or big:
        raise PackError(f"{folder}: {len(files)} files (at most {max_files})"
                        + (f", over {max_mib} MiB: {', '.join(big)}" if big else ""))
    return files


def copy_file(source: Path, target: Path) -> None:
    with replaced_atomically(target) as (tmp,):
        shutil.copyfile(source, tmp)


def write_curve(exp: Path, out: Path) -> bool:
    """learning_curve.png of this run, when matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    from plot_curve import learning_curves, plot

    plot(learning_curves([exp], [None]), out, "dev WER and CER (greedy) on the pack's dev set")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, required=True, help="pack folder (gpu_pack.py)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the model, its logs and results")
    parser.add_argument("--exp", type=Path, required=True, help="experiment folder (checkpoints; resumed)")
    parser.add_argument("--config", default=str(HERE / "gpu.yaml"))
    parser.add_argument("--restart", action="store_true", help="ignore checkpoints already in EXP")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        pack = read_pack(args.pack)
        trainer = Trainer(load_config(args.config, args.overrides), args.pack / "train.jsonl",
                          args.pack / "dev.jsonl", args.exp, progress=not args.no_progress)
        result = trainer.fit(resume=not args.restart)
        train_minutes = (time.perf_counter() - start) / 60
        model = load_model(result.best_dir, device=str(trainer.device))
        dev = evaluate_manifest(model, args.pack / "dev.jsonl", args.exp / "eval" / "dev",
                                progress=not args.no_progress, decoder="greedy")
        ship_model(result.best_dir, args.exp / "fp16", onnx=False)  # half the bytes to bring back
        for name in COPIED:
            copy_file(args.exp / name, args.out / Path(name).name)
        results = {
            "command": shlex.join(["python", *sys.argv]), "config": args.config, "overrides": args.overrides,
            "parameters": model.model.num_parameters(), "steps": result.steps,
            "stopped_by_time": result.steps < trainer.total_steps,  # train.max_minutes came first
            "epochs": round(trainer.audio_seconds / sum(u.duration for u in trainer.train_utts), 2),  # about
            "audio_hours": round(trainer.audio_seconds / 3600, 3), "train_minutes": round(train_minutes, 2),
            "total_minutes": round((time.perf_counter() - start) / 60, 2),
            "dev": {k: dev[k] for k in ("utterances", "wer", "cer", "real_time_factor")},
            "pack": {k: pack.get(k) for k in ("train_hours", "dev_hours", "audio_kbps")},
            "machine": describe_machine(trainer.device),
        }
        write_text_atomically(args.out / "results.json", json.dumps(results, indent=2))
        write_curve(args.exp, args.out / "learning_curve.png")
        files = check_folder(args.out)
    except ASRError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"dev WER {dev['wer']:.2%} CER {dev['cer']:.2%} after {result.steps} steps "
          f"({results['audio_hours']} h of audio) in {results['train_minutes']} min; "
          f"{results['total_minutes']} min in all; {args.out}: {len(files)} files, "
          f"largest {max(p.stat().st_size for p in files) / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
