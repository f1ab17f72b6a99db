"""Dynamic int8 quantization of the GRUs and linear layers against fp32, on the CPU, same files, same run.

    python bench/quantization.py [--model DIR] [--manifest M] [--skip 300] [--limit 300] [--threads 1]
        [--decoder greedy|beam]

Transcribes the manifest's utterances one at a time (greedy unless --decoder beam) with the model loaded as
users get it, torch backend: `asr.load_model(..., precision="fp32")`, then `precision="int8"` (the CPU default:
dynamic int8 GRU and linear layers), then fp32 again (the machine's speed drifts: the baseline is the mean of the two
fp32 passes). Prints WER and time of each.
By default it skips the first 300 speechocean762 dev utterances (those tune the shipped LM weights).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asr  # noqa: E402
from asr.audio import load_audio  # noqa: E402
from asr.decoding import DECODERS  # noqa: E402
from asr.device import describe_machine, machine_line  # noqa: E402
from asr.manifest import read_manifest  # noqa: E402
from asr.metrics import error_rates  # noqa: E402


def timed_wer(model: asr.ASRModel, waves: list[torch.Tensor], refs: list[str], decoder: str) -> tuple[float, float]:
    start = time.perf_counter()
    hyps = [model.transcribe(w, sample_rate=16_000, decoder=decoder).text for w in waves]
    return time.perf_counter() - start, error_rates(refs, hyps).wer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--manifest", required=True, help="e.g. speechocean762 dev from `asr prepare kaldi`")
    parser.add_argument("--skip", type=int, default=300)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a laptop app often has one)")
    parser.add_argument("--decoder", default="greedy", choices=list(DECODERS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    utts = read_manifest(args.manifest)[args.skip: args.skip + args.limit]
    waves, refs = [load_audio(u.audio_filepath) for u in utts], [u.text for u in utts]
    fp32_model, int8_model = (asr.load_model(args.model, device="cpu", backend="torch", precision=precision)
                              for precision in ("fp32", "int8"))
    first = timed_wer(fp32_model, waves, refs, args.decoder)
    int8 = timed_wer(int8_model, waves, refs, args.decoder)
    again = timed_wer(fp32_model, waves, refs, args.decoder)
    base = (first[0] + again[0]) / 2
    seconds = sum(len(w) for w in waves) / 16_000
    print(f"{len(utts)} utterances ({seconds:.0f} s); {machine_line(describe_machine())}")
    print("| network | WER | time | RTF |\n|---|---|---|---|")
    for name, (t, wer) in (("fp32", first), ("int8 (dynamic: GRU, linear)", int8), ("fp32 again", again)):
        print(f"| {name} | {wer:.2%} | {t:.1f} s | {t / seconds:.4f} |")
    print(f"\nint8 is {base / int8[0]:.2f}x the fp32 speed (mean of both fp32 passes); WER "
          f"{(int8[1] - first[1]) * 100:+.2f} points")


if __name__ == "__main__":
    main()
