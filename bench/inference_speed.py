"""CPU inference: where the time goes, and what makes it faster (threads, inference_mode, int8, onnxruntime).

    python bench/inference_speed.py --model exp/so762/best --manifest exp/so762/manifests/dev.jsonl --limit 100

1. Breakdown, torch eager fp32 under torch.no_grad (as ASRModel runs it) with --threads threads:
   audio loading, features (log-mel + normalisation), conv front, GRU stack, output layer (LayerNorm,
   linear, log-softmax), greedy decoding, beam search with the model's LM (lexicon-free without one).
   Utterances go whole (not cut into 30 s windows) in length-sorted batches of --batch-size, as
   ASRModel.posteriors batches them; each stage keeps its fastest of --rounds rounds.
2. Variants of the network (waveforms -> log-probs through ASRModel.posteriors), each over the same
   utterances: torch eager and onnxruntime (model.onnx exported to a temporary file) at 1, --threads
   and all cores, and onnxruntime at --threads with its threads spinning between runs (its default; the
   backend turns that off); torch.inference_mode and dynamic int8 GRU/Linear (torch.ao.quantization.quantize_dynamic)
   at --threads. The variants take turns for --rounds rounds, so a busy machine slows each alike;
   each keeps its fastest round. Wall and CPU seconds (process time: on a busy machine the wall time
   of several threads suffers most, while one thread's CPU time hardly changes). Ratios are against
   the eager baseline (--threads) of the same run. Greedy WER of each variant, and how many
   transcripts differ from the baseline's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

import asr
from asr.audio import SAMPLE_RATE, load_audio, pad_waves
from asr.device import describe_machine, machine_line
from asr.files import write_text_atomically
from asr.manifest import read_manifest
from asr.metrics import error_rates
from asr.serve.onnx_export import OnnxNetwork, export_onnx, onnxruntime_available
from asr.serve.transcribe import ASRModel, TranscribeOptions
from asr.train.corpora import prepare_kaldi


def n_threads(n: int) -> str:
    return f"{n} thread{'s' if n > 1 else ''}"


class Stopwatch:
    """Wall and CPU seconds summed per named stage."""

    def __init__(self):
        self.seconds: dict[str, tuple[float, float]] = {}

    def time(self, stage: str, fn, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        old = self.seconds.get(stage, (0.0, 0.0))
        self.seconds[stage] = (old[0] + time.perf_counter() - wall, old[1] + time.process_time() - cpu)
        return out


def sorted_batches(waves: list[torch.Tensor], batch_size: int):
    """(indices, padded waveforms, lengths) in length order, as ASRModel.posteriors batches them."""
    order = sorted(range(len(waves)), key=lambda k: len(waves[k]))
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        yield idx, *pad_waves([waves[k] for k in idx])


@torch.no_grad()
def breakdown(model: ASRModel, utts, batch_size: int) -> tuple[dict[str, tuple[float, float]], list, list, list]:
    """(Wall, CPU) seconds per stage of torch eager inference; the log-probs, waveforms and beam transcripts."""
    clock = Stopwatch()
    waves = [clock.time("audio loading", load_audio, u.audio_filepath) for u in utts]
    net = model.model
    _, batch, lengths = next(sorted_batches(waves, batch_size))
    net(batch, lengths)  # warm-up
    model.decoder(model.options(decoder="beam")[1])  # loads the LM, untimed
    posteriors: list[torch.Tensor | None] = [None] * len(waves)

    def gru_stack(x, lengths):
        for rnn in net.rnns:
            x = rnn(x, lengths)
        return net.lookahead(x, lengths)  # the row convolution of a unidirectional model (else nothing)

    for idx, batch, lengths in sorted_batches(waves, batch_size):
        feats, frames = clock.time("features (log-mel + normalisation)", net.features, batch, lengths)
        x, out_lengths = clock.time("conv front", net.conv, feats.transpose(1, 2), frames)
        x = clock.time("GRU stack", gru_stack, x, out_lengths)
        log_probs = clock.time("output layer", net.output_log_probs, x)
        for row, k in enumerate(idx):
            posteriors[k] = log_probs[row, : out_lengths[row]]
    durations = [len(w) / SAMPLE_RATE for w in waves]
    for lp, d in zip(posteriors, durations):
        clock.time("greedy decoding", lambda: model.decode(lp, d, decoder="greedy"))
    beam = [clock.time("beam decoding" + (" + LM" if model.lm else " (no LM)"),
                       lambda: model.decode(lp, d, decoder="beam")) for lp, d in zip(posteriors, durations)]
    return clock.seconds, posteriors, waves, beam


def quantized(model: ASRModel) -> ASRModel:
    """A copy with dynamic int8 GRU and Linear weights."""
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        net = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model.model), {nn.GRU, nn.Linear}, torch.qint8)
    return ASRModel(net, model.vocab, word_pieces=model.word_pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="JSONL / CSV manifest")
    source.add_argument("--kaldi", help="Kaldi data folder (text, wav.scp)")
    parser.add_argument("--limit", type=int, default=100, help="first N utterances")
    parser.add_argument("--batch-size", type=int, default=TranscribeOptions.batch_size)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the breakdown and the baseline (default: torch's, %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each variant takes; the fastest counts")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="asr-inference-bench-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    """Both parts of the benchmark; `tmp` holds the Kaldi manifest and the exported model."""
    manifest = args.manifest or prepare_kaldi(args.kaldi, tmp / "kaldi.jsonl")
    utts = read_manifest(manifest)[: args.limit]
    refs = [u.text for u in utts]
    threads = args.threads
    torch.set_num_threads(threads)
    model = asr.load_model(args.model, device="cpu", backend="torch", precision="fp32")
    machine = describe_machine()
    results = {"command": " ".join(["python", *sys.argv]), "machine": machine,
               "load_average_start": machine["load_average"]}

    # 1. where the time goes (each stage's fastest round)
    stages: dict[str, float] = {}
    stage_cpu: dict[str, float] = {}
    for _ in range(args.rounds):
        seconds, posteriors, waves, beam = breakdown(model, utts, args.batch_size)
        stages = {s: min(wall, stages.get(s, float("inf"))) for s, (wall, _) in seconds.items()}
        stage_cpu = {s: min(cpu, stage_cpu.get(s, float("inf"))) for s, (_, cpu) in seconds.items()}
    audio = sum(len(w) for w in waves) / SAMPLE_RATE
    greedy_text = [model.decode(lp, 0.0, decoder="greedy").text for lp in posteriors]
    decoders = [s for s in stages if "decoding" in s]
    total = {d: sum(v for s, v in stages.items() if s not in decoders or s == d) for d in decoders}
    print(f"{machine_line(machine)}; {len(utts)} utterances, {audio:.1f} s of audio", flush=True)
    print(f"\n| stage (torch eager fp32, {n_threads(threads)}, best of {args.rounds}) | seconds | CPU seconds | "
          "share (greedy) | share (beam) | RTF |")
    print("|---|---|---|---|---|---|")
    for stage, sec in stages.items():
        shares = [("—" if stage in decoders and stage != d else f"{sec / total[d]:.1%}") for d in decoders]
        print(f"| {stage} | {sec:.2f} | {stage_cpu[stage]:.2f} | {' | '.join(shares)} | {sec / audio:.4f} |")
    for d in decoders:
        cpu = sum(v for s, v in stage_cpu.items() if s not in decoders or s == d)
        print(f"| total with {d} | {total[d]:.2f} | {cpu:.2f} | | | {total[d] / audio:.4f} |")
    print(f"\nWER: greedy {error_rates(refs, greedy_text).wer:.2%}, "
          f"beam {error_rates(refs, [r.text for r in beam]).wer:.2%}", flush=True)
    results.update(audio_seconds=audio, utterances=len(utts), stages=stages, stages_cpu=stage_cpu, totals=total)

    # 2. variants of the network, taking turns
    counts = sorted({threads, 1, os.cpu_count() or 1})
    baseline = f"torch eager fp32, {n_threads(threads)}"
    variants: dict[str, tuple] = {f"torch eager fp32, {n_threads(n)}": (model, n, nullcontext) for n in counts}
    variants[f"torch inference_mode, {n_threads(threads)}"] = (model, threads, torch.inference_mode)
    variants[f"torch dynamic int8 GRU+Linear, {n_threads(threads)}"] = (quantized(model), threads, nullcontext)
    if onnxruntime_available():
        start = time.perf_counter()
        onnx_file = export_onnx(args.model, tmp / "model.onnx")
        results["onnx_export_seconds"] = time.perf_counter() - start
        for n in counts:
            variants[f"onnxruntime, {n_threads(n)}"] = (
                ASRModel(model.model, model.vocab, onnx=OnnxNetwork(onnx_file, threads=n),
                         word_pieces=model.word_pieces), n, nullcontext)
        variants[f"onnxruntime, {n_threads(threads)}, threads spin (onnxruntime's default)"] = (
            ASRModel(model.model, model.vocab, onnx=OnnxNetwork(onnx_file, threads=threads, spinning=True),
                     word_pieces=model.word_pieces),
            threads, nullcontext)
    else:
        print("onnxruntime not installed: no onnx rows (a dependency: pip install -e .)")
    best: dict[str, tuple[float, float]] = {}
    texts: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, (m, n, context) in variants.items():
            torch.set_num_threads(n)
            wall, cpu = time.perf_counter(), time.process_time()
            with context():
                lps = m.posteriors(waves, TranscribeOptions(batch_size=args.batch_size))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], wall), min(old[1], cpu))
            texts[name] = [m.decode(lp, 0.0).text for lp in lps]
    torch.set_num_threads(threads)
    print(f"\n| network: waveforms -> log-probs, {len(utts)} utts, best of {args.rounds} | seconds | CPU seconds | "
          "RTF | speed vs eager | CPU time vs eager | greedy WER | transcripts ≠ eager |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {}
    for name, (wall, cpu) in best.items():
        rows[name] = {"seconds": wall, "cpu_seconds": cpu, "rtf": wall / audio, "speed_up": best[baseline][0] / wall,
                      "cpu_ratio": cpu / best[baseline][1], "wer": error_rates(refs, texts[name]).wer,
                      "differing": sum(a != b for a, b in zip(texts[name], texts[baseline]))}
        r = rows[name]
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {r['rtf']:.4f} | {r['speed_up']:.2f}× | {r['cpu_ratio']:.2f} | "
              f"{r['wer']:.2%} | {r['differing']} |")
    results["variants"] = rows
    results["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end {results['load_average_end'][0]:.2f} "
          f"({os.cpu_count()} cores: above that, other processes compete for them)")
    if args.json:
        write_text_atomically(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
