"""Streaming latency: how long after a word ends in the audio its text shows, and what each chunk costs.

    python bench/streaming_latency.py --model exp/fsdd-streaming/best \
        --manifest exp/fsdd-streaming/manifests/test.jsonl --limit 100 --chunk-ms 40 80 160 320 640 \
        [--decoder greedy|beam] [--threads 1] [--json OUT]

Real time is simulated without sleeping. Each utterance is loaded at 16 kHz (untimed) and streams on its own
(`ASRModel.stream`, the default stream options), cut into chunks of c = --chunk-ms: chunk k holds samples
[k c, (k+1) c) and arrives at audio time a_k = (k+1) c (the last, shorter one at the utterance's end,
together with `finish()`). Every `feed` / `finish` call is timed (wall clock, t_k) and the calls queue on one
worker: call k starts at s_k = max(a_k, d_(k-1)) and is done at d_k = s_k + t_k; the events it returns are
shown at d_k.

The words are those of each segment's "final" event, with their end times (the frame after the word's last
character, as the offline pass gives them; the last segment's clamped to the audio's end). For word j of a
segment, with d the time an event is shown:

- first-partial latency = d of the first event of the segment (partial or final) whose word j is that word,
  minus the word's end;
- final latency = d of the event from which on every event of the segment, its final event included, has
  that word as word j (the word's final text: it never changes afterwards; at worst the final event), minus
  the word's end;
- the same with a instead of d (`*_audio`): the part that the model's right context and the chunking cost,
  without compute; and `final_event`: d of the segment's final event (it waits for endpoint_seconds of
  silence, or for the end of the audio), minus the word's end.

Per chunk size: median and 90th percentile (numpy's linear interpolation) of each over all words; RTF =
compute seconds (all calls) / audio seconds; each call's compute; the wait s_k - a_k of each chunk behind
the computation of earlier ones. Compute keeps up when no chunk waited as long as a chunk lasts.

No latency can be below `latency_floor` = min(0, future_samples / 16 kHz - frame_seconds): output frame t is
decoded only once the samples up to t * time_stride * hop + future_samples arrived (before that they are
missing from its input), a word ends 1 frame after its last character's frame, and ends clamped at
`finish` are at most the audio's end, which arrived with the last chunk. One utterance streams once in
160 ms chunks before timing starts (warm-up, not counted).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asr  # noqa: E402
from asr.audio import SAMPLE_RATE, load_audio  # noqa: E402
from asr.device import describe_machine, machine_line  # noqa: E402
from asr.errors import OptionsError  # noqa: E402
from asr.files import write_text_atomically  # noqa: E402
from asr.manifest import read_manifest  # noqa: E402
from asr.model import ModelConfig  # noqa: E402
from asr.serve.streaming import StreamEvent  # noqa: E402
from asr.serve.transcribe import ASRModel  # noqa: E402

LATENCIES = ["first_partial", "final", "first_partial_audio", "final_audio", "final_event"]


@dataclass
class Shown:
    """An event, when its chunk arrived (audio seconds) and when its computation was done."""

    event: StreamEvent
    arrival: float
    done: float


@dataclass
class StreamRun:
    """One utterance streamed in chunks: the events as shown, and each call's compute and wait (seconds)."""

    shown: list[Shown]
    compute: list[float]
    wait: list[float]


def stream_utterance(model: ASRModel, wave: torch.Tensor, chunk: int, **options) -> StreamRun:
    """Feed `wave` in chunks of `chunk` samples, then finish, timing each call and queueing them (see above)."""
    streamer = model.stream(SAMPLE_RATE, **options)
    run, free = StreamRun([], [], []), 0.0  # free: when the worker is done with the calls so far
    starts = list(range(0, len(wave), chunk))
    calls = [(min(s + chunk, len(wave)), wave[s: s + chunk]) for s in starts] + [(len(wave), None)]
    for end, samples in calls:
        arrival = end / SAMPLE_RATE
        clock = time.perf_counter()
        events = streamer.finish() if samples is None else streamer.feed(samples)
        compute = time.perf_counter() - clock
        begin = max(arrival, free)
        free = begin + compute
        run.compute.append(compute)
        run.wait.append(begin - arrival)
        run.shown += [Shown(e, arrival, free) for e in events]
    return run


def segments(shown: list[Shown]) -> list[list[Shown]]:
    """The events of each segment, its final event last (partials after the last final belong to none)."""
    out, current = [], []
    for s in shown:
        current.append(s)
        if s.event.kind == "final":
            out.append(current)
            current = []
    return out


def word_latencies(shown: list[Shown]) -> list[dict]:
    """Each final word with its latencies (seconds; see the module docstring)."""
    words = []
    for segment in segments(shown):
        final = segment[-1]
        for j, word in enumerate(final.event.words):
            has = [len(s.event.words) > j and s.event.words[j].word == word.word for s in segment]
            first = segment[has.index(True)]
            stable = len(has) - 1  # the final event has it; go back while the events before have it too
            while stable and has[stable - 1]:
                stable -= 1
            settled = segment[stable]
            words.append({"word": word.word, "end": word.end,
                          "first_partial": first.done - word.end, "final": settled.done - word.end,
                          "first_partial_audio": first.arrival - word.end, "final_audio": settled.arrival - word.end,
                          "final_event": final.done - word.end})
    return words


def latency_floor(config: ModelConfig) -> float:
    """No word latency can be lower (see the module docstring)."""
    return min(0.0, config.future_samples / SAMPLE_RATE - config.frame_seconds)


def stats(values: list[float]) -> dict:
    """Median and 90th percentile (None without values)."""
    if not values:
        return {"median": None, "p90": None}
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def measure(model: ASRModel, waves: list[torch.Tensor], chunk_ms: float, **options) -> dict:
    """All utterances at one chunk size: the summary and every word's latencies."""
    chunk = max(1, round(chunk_ms * SAMPLE_RATE / 1000))
    words, compute, wait = [], [], []
    for i, wave in enumerate(waves):
        run = stream_utterance(model, wave, chunk, **options)
        words += [{"utterance": i, **w} for w in word_latencies(run.shown)]
        compute += run.compute
        wait += run.wait
    audio = sum(len(w) for w in waves) / SAMPLE_RATE
    chunk_seconds = chunk / SAMPLE_RATE
    return {"chunk_ms": chunk_ms, "chunk_samples": chunk, "words": len(words),
            **{name: stats([w[name] for w in words]) for name in LATENCIES},
            "compute_seconds": sum(compute), "rtf": sum(compute) / audio, "calls": len(compute),
            "compute_per_call": {**stats(compute), "max": max(compute)},
            "wait": {**stats(wait), "max": max(wait)}, "keeps_up": max(wait) < chunk_seconds,
            "word_latencies": words}


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f}"


def table(results: list[dict]) -> str:
    lines = ["| chunk | words | first partial median / p90 (ms) | final median / p90 (ms) | RTF | "
             "compute per chunk median / max (ms) | longest wait (ms) | keeps up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        fp, fi, c = r["first_partial"], r["final"], r["compute_per_call"]
        lines.append(f"| {r['chunk_ms']:g} ms | {r['words']} | {ms(fp['median'])} / {ms(fp['p90'])} | "
                     f"{ms(fi['median'])} / {ms(fi['p90'])} | {r['rtf']:.4f} | {ms(c['median'])} / {ms(c['max'])} | "
                     f"{ms(r['wait']['max'])} | {'yes' if r['keeps_up'] else 'no'} |")
    return "\n".join(lines)


def positive(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a streaming (unidirectional) model folder")
    parser.add_argument("--manifest", required=True, help="JSONL / CSV manifest of the utterances")
    parser.add_argument("--limit", type=int, default=100, help="first N utterances")
    parser.add_argument("--chunk-ms", type=positive, nargs="+", default=[40, 80, 160, 320, 640])
    parser.add_argument("--decoder", default="greedy", choices=["greedy", "beam"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.limit < 1 or args.threads < 1:
        parser.error("--limit and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    model = asr.load_model(args.model, device="cpu", backend="torch")
    if model.model.config.bidirectional:
        raise OptionsError(f"{args.model}: this model cannot stream (bidirectional GRUs); give a model trained "
                           "with model.bidirectional=false, e.g. from recipes/fsdd/streaming.yaml")
    waves = [load_audio(u.audio_filepath) for u in read_manifest(args.manifest)[: args.limit]]
    options = {"decoder": args.decoder}
    stream_utterance(model, waves[0], SAMPLE_RATE * 160 // 1000, **options)  # warm-up
    machine = describe_machine()
    results = [measure(model, waves, chunk_ms, **options) for chunk_ms in args.chunk_ms]
    audio = sum(len(w) for w in waves) / SAMPLE_RATE
    floor = latency_floor(model.model.config)
    print(f"{machine_line(machine)}\n{args.model}, {args.decoder}, {len(waves)} utterances, {audio:.1f} s of audio; "
          f"no latency can be below {floor * 1000:.0f} ms (the model's right context)\n")
    print(table(results))
    report = {"command": " ".join(["python", *(sys.argv if argv is None else [__file__, *argv])]),
              "machine": machine, "model": args.model, "manifest": args.manifest, "decoder": args.decoder,
              "threads": args.threads, "utterances": len(waves), "audio_seconds": audio, "latency_floor": floor,
              "results": results}
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
