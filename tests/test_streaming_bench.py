"""bench/streaming_latency.py: the latency definitions, the queue of chunk computations, and a run on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import asr
from asr.checkpoint import save_model
from asr.decoding import Word
from asr.errors import OptionsError
from asr.model import DeepSpeech2, ModelConfig
from asr.serve.streaming import StreamEvent

from .conftest import TEXTS, write_tone_corpus

_PATH = Path(__file__).resolve().parents[1] / "bench" / "streaming_latency.py"
_spec = importlib.util.spec_from_file_location("bench_streaming_latency", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_streaming_latency"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)


def event(kind: str, text: str, ends: list[float] | None = None) -> StreamEvent:
    ends = ends or [0.1 * (i + 1) for i in range(len(text.split()))]
    return StreamEvent(kind, text, [Word(w, e - 0.05, e, 1.0) for w, e in zip(text.split(), ends)])


def test_word_latencies_follow_their_definitions():
    shown = [bench.Shown(event("partial", "dig"), 0.2, 0.3),
             bench.Shown(event("partial", "dig a"), 0.4, 0.5),
             bench.Shown(event("partial", "dig o"), 0.6, 0.6),  # word 2 changes, then comes back
             bench.Shown(event("partial", "dig a"), 0.6, 0.7),
             bench.Shown(event("final", "dig a hole", [0.1, 0.25, 0.9]), 1.0, 1.5),
             bench.Shown(event("partial", "bad"), 1.8, 1.9),  # a second segment: its word 1 is its own
             bench.Shown(event("final", "bad egg", [1.7, 2.0]), 2.0, 2.1),
             bench.Shown(event("partial", "x"), 2.2, 2.2)]  # no final event: not counted
    speech = torch.zeros(200, dtype=torch.bool)  # 10 ms frames, frame i ending at (i + 1/2) * 10 ms
    speech[[20, 85, 86, 87, 88, 89, 90, 160, 199]] = True
    words = bench.word_latencies(shown, speech)
    assert [w["word"] for w in words] == ["dig", "a", "hole", "bad", "egg"]
    assert [w["emitted_end"] for w in words] == [0.1, 0.25, 0.9, 1.7, 2.0]
    # dig: no speech frame ends by 0.1 s; hole: frame 90 ends at 0.905 s, after its emitted end
    assert [w["sound_end"] for w in words] == pytest.approx([0.1, 0.205, 0.895, 1.605, 1.995])
    vs_emitted = [(0.2, 0.2, 0.1, 0.1, 1.4), (0.25, 0.45, 0.15, 0.35, 1.25), (0.6, 0.6, 0.1, 0.1, 0.6),
                  (0.2, 0.2, 0.1, 0.1, 0.4), (0.1, 0.1, 0.0, 0.0, 0.1)]
    for w, expected in zip(words, vs_emitted):
        assert [w[name] for name in bench.VS_EMITTED] == pytest.approx(expected)
        later = w["emitted_end"] - w["sound_end"]
        assert [w[name] for name in bench.LATENCIES] == pytest.approx([e + later for e in expected])


class FakeStreamer:
    """Each call "computes" for the next of `seconds` on a fake clock and returns one partial event."""

    def __init__(self, clock: list[float], seconds: list[float]):
        self.clock, self.seconds, self.fed = clock, list(seconds), []

    def _call(self, n: int) -> list[StreamEvent]:
        self.fed.append(n)
        self.clock[0] += self.seconds.pop(0)
        return [event("partial", "x")]

    def feed(self, samples) -> list[StreamEvent]:
        return self._call(len(samples))

    def finish(self) -> list[StreamEvent]:
        return self._call(0)


def test_calls_queue_behind_each_other(monkeypatch):
    clock = [0.0]
    streamer = FakeStreamer(clock, [0.05, 0.25, 0.05, 0.01])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    model = type("FakeModel", (), {"stream": lambda self, rate, **options: streamer})()
    run = bench.stream_utterance(model, torch.zeros(4000), 1600)  # 0.25 s in 0.1 s chunks: 1600, 1600, 800, finish
    assert streamer.fed == [1600, 1600, 800, 0]
    assert run.compute == pytest.approx([0.05, 0.25, 0.05, 0.01])
    # arrivals 0.1, 0.2, 0.25, 0.25; done 0.15, 0.45 (on time), 0.5 (waited 0.2), 0.51 (waited 0.25)
    assert run.wait == pytest.approx([0.0, 0.0, 0.2, 0.25])
    assert [(s.arrival, s.done) for s in run.shown] == [pytest.approx(x) for x in
                                                        [(0.1, 0.15), (0.2, 0.45), (0.25, 0.5), (0.25, 0.51)]]


def test_the_tail_streams_as_chunks_before_finish(monkeypatch):
    clock = [0.0]
    streamer = FakeStreamer(clock, [0.01] * 6)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    model = type("FakeModel", (), {"stream": lambda self, rate, **options: streamer})()
    run = bench.stream_utterance(model, torch.ones(4000), 1600, 3200)  # 0.25 s of sound, then 0.2 s of silence
    assert streamer.fed == [1600, 1600, 1600, 1600, 800, 0]
    assert [s.arrival for s in run.shown] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.45, 0.45])


def test_a_negative_tail_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--model", "m", "--manifest", "x.jsonl", "--tail-ms", "-1"])
    assert "--tail-ms must be a number >= 0" in capsys.readouterr().err


def test_a_bidirectional_model_is_refused(tmp_path):
    cfg = ModelConfig(conv_channels=[4], conv_kernels=[[3, 3]], conv_strides=[[1, 1]], gru_layers=1, gru_hidden=8)
    save_model(tmp_path / "m", DeepSpeech2(cfg), asr.Vocabulary())
    manifest = write_tone_corpus(tmp_path / "tones", TEXTS[:1])
    with pytest.raises(OptionsError, match=re.escape(f"{tmp_path / 'm'}: this model cannot stream")):
        bench.main(["--model", str(tmp_path / "m"), "--manifest", str(manifest)])


def test_bench_runs_on_a_tiny_streaming_model(streaming_model, tmp_path, capsys):
    texts = TEXTS[:4]
    manifest = write_tone_corpus(tmp_path / "tones", texts)  # the training audio: the model knows its words
    out = tmp_path / "latency.json"
    # 50 ms of silence after each utterance: this model, trained without end silence, spells letters in 100 ms of
    # digital zeros
    report = bench.main(["--model", str(streaming_model), "--manifest", str(manifest), "--chunk-ms", "40", "320",
                         "--tail-ms", "50", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert "| 320 ms |" in capsys.readouterr().out and report["tail_ms"] == 50
    config = asr.load_model(streaming_model, device="cpu").model.config
    right_context = config.future_samples / 16_000 - config.frame_seconds  # see the bench's docstring
    assert report["latency_floor"] == pytest.approx(min(0.0, right_context))
    lengths = [len(asr.load_audio(tmp_path / "tones" / f"utt{i}.wav")) for i in range(len(texts))]
    assert report["utterances"] == 4 and report["audio_seconds"] == pytest.approx(sum(lengths) / 16_000)
    assert report["streamed_seconds"] == pytest.approx(report["audio_seconds"] + 4 * 0.05)
    # where each word's tones are (tone_speech: 0.1 s, then 70 ms a letter, 120 ms a space)
    tones = [[], [], [], []]
    for i, text in enumerate(texts):
        at = 0.1
        for word in text.split():
            tones[i].append((at, at + 0.07 * len(word)))
            at += 0.07 * len(word) + 0.12
    by_chunk = {r["chunk_ms"]: r for r in report["results"]}
    assert list(by_chunk) == [40, 320]
    for chunk_ms, r in by_chunk.items():
        chunk = r["chunk_samples"]
        # the tail goes in as chunks (more calls than the audio alone), then one finish
        assert chunk == 16 * chunk_ms and r["calls"] == sum(math.ceil((n + 800) / chunk) + 1 for n in lengths)
        words = r["word_latencies"]
        assert [w["word"] for w in words] == " ".join(texts).split() and r["words"] == len(words)
        assert r["rtf"] == pytest.approx(r["compute_seconds"] / report["streamed_seconds"]) and r["rtf"] > 0
        assert r["keeps_up"] == (r["wait"]["max"] < chunk / 16_000)
        for w, (start, end) in zip(words, [t for u in tones for t in u]):
            assert all(math.isfinite(w[name]) for name in bench.LATENCIES + bench.VS_EMITTED)
            # the reference is the end of a speech-like frame of the word's own tones, never after its emitted end
            assert start < w["sound_end"] <= min(w["emitted_end"], end + 0.02), w
            for name in bench.LATENCIES:
                assert w[name] == pytest.approx(w[f"{name}_vs_emitted"] + w["emitted_end"] - w["sound_end"])
            assert report["latency_floor"] <= w["first_partial_audio"] <= w["first_partial"] <= w["final"]
            assert w["first_partial_audio"] <= w["final_audio"] <= w["final"] <= w["final_event"]
            # greedy: a word shows with the first chunk that holds its last frame's input (ends are rounded to ms)
            assert w["first_partial_audio_vs_emitted"] <= right_context + chunk / 16_000 + 1e-3, w
        assert r["first_partial"]["median"] <= r["first_partial"]["p90"] <= max(w["first_partial"] for w in words)
    # the same frames decoded, later arrivals: a word shows no earlier with 320 ms chunks than with 40 ms ones
    for small, big in zip(by_chunk[40]["word_latencies"], by_chunk[320]["word_latencies"]):
        assert big["first_partial_audio"] >= small["first_partial_audio"] - 1e-9
