"""What every recipe does after preparing its manifests: train, score the test sets, write a results table."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from asr.config import load_config
from asr.device import describe_machine, machine_line
from asr.files import replaced_atomically
from asr.lm.language_model import build_lm
from asr.lm.tune import store_decoder, tune_beam
from asr.serve.evaluate import evaluate_manifest
from asr.serve.transcribe import load_model
from asr.train.distributed import destroy
from asr.train.trainer import Trainer


def recipe_arguments(description: str, data_env: str, default_data: str, default_config: Path
                     ) -> argparse.ArgumentParser:
    """The options every recipe takes: --data, --out, --config, --device and key=value overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default=os.environ.get(data_env, default_data),
                        help=f"corpus folder (default: ${data_env} or {default_data})")
    parser.add_argument("--out", required=True, help="experiment folder; the best model goes to OUT/best")
    parser.add_argument("--config", default=str(default_config), help="YAML configuration")
    parser.add_argument("--restart", action="store_true", help="ignore checkpoints already in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--beam", action="store_true", help="also score with beam search and an n-gram LM "
                        "built from the training transcripts (plus --lm-text), its weights tuned on dev")
    parser.add_argument("--lm-text", nargs="*", default=[], help="more LM text files (with --beam)")
    parser.add_argument("--lm-order", type=int, default=3, help="LM order (with --beam)")
    parser.add_argument("--lm-text-weights", type=int, nargs="+", help="times to repeat the training transcripts "
                        "and then each --lm-text in the LM's text (with --beam; default once each)")
    parser.add_argument("--lm-prune", type=int, nargs="+", help="lmplz count thresholds per order (with --beam; "
                        "default none)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")
    return parser


def run_experiment(args: argparse.Namespace, train: Path, dev: Path, tests: dict[str, Path], command: str) -> dict:
    """Train on `train` (selecting on `dev`), score the best model on each test set, write OUT/RESULTS.md."""
    out = Path(args.out)
    config = load_config(args.config, args.overrides)
    start = time.perf_counter()
    trainer = Trainer(config, train, dev, out, progress=not args.no_progress)
    try:
        result = trainer.fit(resume=not args.restart)
    finally:
        destroy(trainer.dist)
    if not trainer.dist.is_main:  # under torchrun, rank 0 scores the test sets alone
        return {}
    train_minutes = (time.perf_counter() - start) / 60
    model = load_model(result.best_dir, device=str(trainer.device))
    rows = {}
    for name, manifest in {"dev": dev, **tests}.items():
        rows[name] = evaluate_manifest(model, manifest, out / "eval" / name, progress=not args.no_progress,
                                       decoder="greedy")  # a resumed run's best/ may hold a decoder.json
    if args.beam:  # an LM from training text only; alpha/beta chosen on dev; every set scored again
        build_lm([train, *args.lm_text], out / "lm", order=args.lm_order, prune=args.lm_prune or [0] * args.lm_order,
                 weights=args.lm_text_weights)
        model = load_model(result.best_dir, device=str(trainer.device), lm=out / "lm")
        store_decoder(result.best_dir, out / "lm", tune_beam(model, dev, progress=not args.no_progress))
        model = load_model(result.best_dir, device=str(trainer.device))
        for name, manifest in {"dev": dev, **tests}.items():
            rows[f"{name} (beam + LM)"] = evaluate_manifest(model, manifest, out / "eval" / f"{name}-beam",
                                                            progress=not args.no_progress, decoder="beam")
    results = {
        "command": command, "config": args.config, "overrides": args.overrides,
        "parameters": model.model.num_parameters(), "steps": result.steps,
        "train_minutes": round(train_minutes, 1), "total_minutes": round((time.perf_counter() - start) / 60, 1),
        "machine": describe_machine(trainer.device),
        "results": {k: {m: v[m] for m in ("utterances", "wer", "cer", "real_time_factor")} for k, v in rows.items()},
    }
    lines = [f"Command: `{command}`", "",
             f"{results['parameters'] / 1e6:.2f} M parameters, {result.steps} steps; {results['train_minutes']} min "
             f"of training, {results['total_minutes']} min with scoring, on {machine_line(results['machine'])}.", "",
             "| set | utterances | WER | CER |", "|---|---|---|---|"]
    for name, r in results["results"].items():
        lines.append(f"| {name} | {r['utterances']} | {r['wer']:.2%} | {r['cer']:.2%} |")
    with replaced_atomically(out / "results.json", out / "RESULTS.md") as (json_file, table_file):  # together
        json_file.write_text(json.dumps(results, indent=2), encoding="utf-8")
        table_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return results
