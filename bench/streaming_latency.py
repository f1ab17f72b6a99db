"""Streaming latency: how long after a word's sound ends its text shows, and what each chunk costs.

    python bench/streaming_latency.py --model exp/fsdd-streaming/best \
        --manifest exp/fsdd-streaming/manifests/test.jsonl --limit 100 --chunk-ms 40 80 160 320 640 \
        [--tail-ms 1000] [--decoder greedy|beam] [--threads 1] [--json OUT]

Real time is simulated without sleeping. Each utterance is loaded at 16 kHz (untimed) and followed by a tail
of T = --tail-ms of silence (zeros): a live stream goes on after the speech, and nothing calls `finish()` when
a word ends, so a word shows once the model spells it from audio that arrived. It streams on its own
(`ASRModel.stream`, the default stream options), cut into chunks of c = --chunk-ms: chunk k holds samples
[k c, (k+1) c) of the utterance and its tail and arrives at audio time a_k = (k+1) c (the last, shorter one at
the tail's end, together with `finish()`, which adds the model's end_silence_ms). Every `feed` / `finish` call
is timed (wall clock, t_k) and the calls queue on one worker: call k starts at s_k = max(a_k, d_(k-1)) and is
done at d_k = s_k + t_k; the events it returns are shown at d_k. --tail-ms 0 finishes at the utterance's end
(the bench before --tail-ms).

The words are those of each segment's "final" event. A word's emitted end e is its end time there (the frame
after the word's last character; the last segment's clamped to the tail's end): a model that spells words
late (one-way CTC, more so with end_silence_ms) puts it after the word's sound. The reference end r is where
the sound ends: the end, (i + 1/2) * 10 ms, of the last 10 ms frame i (centred on sample i * SPEECH_HOP) that
`asr.speech_activity.speech_frames` finds speech-like in the utterance and that ends at or before e; e itself
if there is none. So r <= e; r falls in a later word's sound if the model spells a word after that one began
(latency undercounted). For word j of a segment, with d the time an event is shown:

- first-partial latency = d of the first event of the segment (partial or final) whose word j is that word,
  minus r;
- final latency = d of the event from which on every event of the segment, its final event included, has
  that word as word j (the word's final text: it never changes afterwards; at worst the final event), minus r;
- the same with a instead of d (`*_audio`): the part that the model's right context and the chunking cost,
  without compute; and `final_event`: d of the segment's final event (it waits for endpoint_seconds of
  silence, or for the end of the tail), minus r;
- `*_vs_emitted`: each of these minus e instead of r (the bench's definition before the reference end).

Per chunk size: median and 90th percentile (numpy's linear interpolation) of each over all words; RTF =
compute seconds (all calls) / streamed seconds (utterances and tails); each call's compute; the wait
s_k - a_k of each chunk behind the computation of earlier ones. Compute keeps up when no chunk waited as long
as a chunk lasts.

No latency can be below `latency_floor` = min(0, future_samples / 16 kHz - frame_seconds) (against e, so
against r <= e neither): output frame t is decoded only once the samples up to t * time_stride * hop +
future_samples arrived (before that they are missing from its input), a word's emitted end is 1 frame after
its last character's frame, and ends clamped at `finish` are at most the tail's end, which arrived with the
last chunk. One utterance streams once in 160 ms chunks, with its tail, before timing starts (warm-up, not
counted).
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
from asr.speech_activity import SPEECH_HOP, speech_frames  # noqa: E402

LATENCIES = ["first_partial", "final", "first_partial_audio", "final_audio", "final_event"]
VS_EMITTED = [f"{name}_vs_emitted" for name in LATENCIES]


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


def stream_utterance(model: ASRModel, wave: torch.Tensor, chunk: int, tail: int = 0, **options) -> StreamRun:
    """Feed `wave` and `tail` samples of silence in chunks of `chunk` samples, then finish, timing each call and
    queueing them (see above)."""
    streamer = model.stream(SAMPLE_RATE, **options)
    wave = torch.nn.functional.pad(wave, (0, tail))
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


def sound_end(speech: torch.Tensor, emitted_end: float) -> float:
    """The end of the last speech-like frame of `speech` (speech_frames) ending at or before `emitted_end`,
    else `emitted_end` (seconds)."""
    ends = torch.arange(len(speech)) * SPEECH_HOP + SPEECH_HOP // 2  # samples: frame i is centred on i * SPEECH_HOP
    before = ends[speech & (ends <= round(emitted_end * SAMPLE_RATE))]
    return min(emitted_end, before[-1].item() / SAMPLE_RATE) if len(before) else emitted_end


def word_latencies(shown: list[Shown], speech: torch.Tensor) -> list[dict]:
    """Each final word with its ends and latencies (seconds; see the module docstring); `speech`: the
    utterance's speech_frames."""
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
            shown_at = dict(zip(LATENCIES, [first.done, settled.done, first.arrival, settled.arrival, final.done]))
            end = sound_end(speech, word.end)
            words.append({"word": word.word, "sound_end": end, "emitted_end": word.end,
                          **{name: at - end for name, at in shown_at.items()},
                          **{f"{name}_vs_emitted": at - word.end for name, at in shown_at.items()}})
    return words


def latency_floor(config: ModelConfig) -> float:
    """No word latency can be lower (see the module docstring)."""
    return min(0.0, config.future_samples / SAMPLE_RATE - config.frame_seconds)


def stats(values: list[float]) -> dict:
    """Median and 90th percentile (None without values)."""
    if not values:
        return {"median": None, "p90": None}
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def measure(model: ASRModel, waves: list[torch.Tensor], speech: list[torch.Tensor], chunk_ms: float, tail: int,
            **options) -> dict:
    """All utterances (`speech`: their speech_frames) at one chunk size, each followed by `tail` samples of
    silence: the summary and every word's latencies."""
    chunk = max(1, round(chunk_ms * SAMPLE_RATE / 1000))
    words, compute, wait = [], [], []
    for i, (wave, frames) in enumerate(zip(waves, speech)):
        run = stream_utterance(model, wave, chunk, tail, **options)
        words += [{"utterance": i, **w} for w in word_latencies(run.shown, frames)]
        compute += run.compute
        wait += run.wait
    streamed = sum(len(w) + tail for w in waves) / SAMPLE_RATE
    chunk_seconds = chunk / SAMPLE_RATE
    return {"chunk_ms": chunk_ms, "chunk_samples": chunk, "words": len(words),
            **{name: stats([w[name] for w in words]) for name in LATENCIES + VS_EMITTED},
            "compute_seconds": sum(compute), "rtf": sum(compute) / streamed, "calls": len(compute),
            "compute_per_call": {**stats(compute), "max": max(compute)},
            "wait": {**stats(wait), "max": max(wait)}, "keeps_up": max(wait) < chunk_seconds,
            "word_latencies": words}


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f}"


def table(results: list[dict]) -> str:
    lines = ["| chunk | words | first partial median / p90 (ms) | final median / p90 (ms) | "
             "final vs emitted end median / p90 (ms) | RTF | compute per chunk median / max (ms) | "
             "longest wait (ms) | keeps up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fp, fi, fe, c = r["first_partial"], r["final"], r["final_vs_emitted"], r["compute_per_call"]
        lines.append(f"| {r['chunk_ms']:g} ms | {r['words']} | {ms(fp['median'])} / {ms(fp['p90'])} | "
                     f"{ms(fi['median'])} / {ms(fi['p90'])} | {ms(fe['median'])} / {ms(fe['p90'])} | "
                     f"{r['rtf']:.4f} | {ms(c['median'])} / {ms(c['max'])} | "
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
    parser.add_argument("--tail-ms", type=float, default=1000.0,
                        help="ms of silence streamed after each utterance before finish() (default: %(default)g)")
    parser.add_argument("--decoder", default="greedy", choices=["greedy", "beam"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.limit < 1 or args.threads < 1:
        parser.error("--limit and --threads must be at least 1")
    if not math.isfinite(args.tail_ms) or args.tail_ms < 0:
        parser.error(f"--tail-ms must be a number >= 0, not {args.tail_ms!r}")
    torch.set_num_threads(args.threads)
    model = asr.load_model(args.model, device="cpu", backend="torch")
    if model.model.config.bidirectional:
        raise OptionsError(f"{args.model}: this model cannot stream (bidirectional GRUs); give a model trained "
                           "with model.bidirectional=false, e.g. from recipes/fsdd/streaming.yaml")
    waves = [load_audio(u.audio_filepath) for u in read_manifest(args.manifest)[: args.limit]]
    speech = [speech_frames(w) for w in waves]
    tail = round(args.tail_ms * SAMPLE_RATE / 1000)
    options = {"decoder": args.decoder}
    stream_utterance(model, waves[0], SAMPLE_RATE * 160 // 1000, tail, **options)  # warm-up
    machine = describe_machine()
    results = [measure(model, waves, speech, chunk_ms, tail, **options) for chunk_ms in args.chunk_ms]
    audio = sum(len(w) for w in waves) / SAMPLE_RATE
    floor = latency_floor(model.model.config)
    print(f"{machine_line(machine)}\n{args.model}, {args.decoder}, {len(waves)} utterances, {audio:.1f} s of audio, "
          f"each followed by {args.tail_ms:g} ms of silence; latencies from the end of each word's sound (and from "
          f"its emitted end); no latency can be below {floor * 1000:.0f} ms (the model's right context)\n")
    print(table(results))
    report = {"command": " ".join(["python", *(sys.argv if argv is None else [__file__, *argv])]),
              "machine": machine, "model": args.model, "manifest": args.manifest, "decoder": args.decoder,
              "threads": args.threads, "tail_ms": args.tail_ms, "utterances": len(waves), "audio_seconds": audio,
              "streamed_seconds": audio + len(waves) * tail / SAMPLE_RATE, "latency_floor": floor,
              "results": results}
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
