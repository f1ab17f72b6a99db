"""Streaming inference (asr/serve/streaming.py): exactly the offline posteriors and text, chunk by chunk."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import asr
from asr.audio import AudioError
from asr.errors import OptionsError
from asr.features import GLOBAL_STATISTICS
from asr.model import DeepSpeech2, ModelConfig
from asr.serve.streaming import PosteriorStream, StreamError

from .conftest import (
    TEXTS,
    require_system_tools,
    tone_speech,
)
from .test_streaming_model import one_way

# random unidirectional models: (conv kernels, conv strides, lookahead frames, feature settings)
MODELS = [
    ([[11, 21], [11, 11]], [[2, 2], [1, 2]], 2, {}),
    ([[4, 5], [3, 3], [5, 3]], [[2, 2], [3, 1], [1, 1]], 1, {"normalization": "global", "win_ms": 20.0, "n_fft": 401}),
    ([[5, 11]], [[2, 2]], 0, {"hop_ms": 40.0, "win_ms": 8.0, "n_fft": 256}),  # a hop longer than the window
    ([[11, 21], [11, 11]], [[2, 2], [1, 2]], 2,  # a level window that slides within the stream
     {"normalization": "running_level", "level_window_ms": 370.0, "level_prior_ms": 50.0}),
]


def random_model(case=MODELS[1]) -> DeepSpeech2:
    kernels, strides, lookahead, features = case
    model = one_way(kernels, strides, lookahead, **features)
    if model.config.features.normalization in GLOBAL_STATISTICS:
        model.features.set_global_stats(torch.linspace(-3, 1, 40), torch.linspace(1, 2, 40))
    return model


def noise(samples: int, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(samples, generator=torch.Generator().manual_seed(seed))


def offline(model: DeepSpeech2, wave: torch.Tensor) -> torch.Tensor:
    return asr.ASRModel(model, asr.Vocabulary()).posteriors([wave])[0]


def streamed(stream: PosteriorStream, wave: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All the frames a stream gives for `wave` fed in chunks of `sizes` samples (repeated), then finished."""
    out, i, k = [], 0, 0
    while i < len(wave):
        out.append(stream.feed(wave[i: i + sizes[k % len(sizes)]]))
        i, k = i + sizes[k % len(sizes)], k + 1
    return torch.cat(out + [stream.finish()])


# ---------------------------------------------------------------- posteriors: exactly the offline pass


@pytest.mark.parametrize("case", MODELS)
@pytest.mark.parametrize("chunk_ms", [10, 160, 1000])
def test_streamed_posteriors_equal_the_offline_ones(case, chunk_ms):
    model = random_model(case)
    wave = noise(36_123)
    expected = offline(model, wave)
    got = streamed(PosteriorStream(model), wave, [16 * chunk_ms])
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("chunk_ms", [10, 160, 1000])
def test_the_end_silence_streams_as_offline(chunk_ms):
    model = one_way([[11, 21], [11, 11]], [[2, 2], [1, 2]], 2, end_silence_ms=250)
    wave = noise(20_011)
    expected = offline(model, wave)
    stream = PosteriorStream(model)
    got = streamed(stream, wave, [16 * chunk_ms])
    assert got.shape == expected.shape and len(got) == model.output_lengths(torch.tensor([20_011]))[0]
    assert torch.allclose(got, expected, atol=1e-4)
    assert stream.samples == 20_011  # the silence is the model's, not the stream's audio


def test_chunks_of_any_size_and_short_streams():
    model = random_model()
    wave = noise(20_000, seed=1)
    sizes = [1, 0, 1, 7, 0, 333, 1, 4096, 2, 159, 161]
    assert torch.allclose(streamed(PosteriorStream(model), wave, sizes), offline(model, wave), atol=1e-4)
    for n in (1, 150, 401, 1000):  # shorter than the FFT window, than its padding, than one output frame
        short = noise(n, seed=n)
        got, expected = streamed(PosteriorStream(model), short, [n // 3 + 1]), offline(model, short)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4), n
    stream = PosteriorStream(model)
    assert stream.finish().shape == (0, 29)  # no audio: no frames


def test_the_comparison_sees_a_lost_gru_state():
    """What the exactness tests would catch: a GRU state not carried from one chunk to the next."""
    model = random_model(MODELS[0])
    wave = noise(16_000, seed=2)
    expected = offline(model, wave)
    stream = PosteriorStream(model)
    forgetful = [stream.feed(wave[:8000])]
    stream.hidden = [None] * len(stream.hidden)
    forgetful += [stream.feed(wave[8000:]), stream.finish()]
    assert (torch.cat(forgetful) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("rate", [8000, 44_100])
def test_other_rates_are_resampled_as_load_audio_resamples(rate):
    model = random_model()
    wave = noise(2 * rate + 17, seed=3)
    expected = offline(model, asr.load_audio(wave.numpy(), rate))
    got = streamed(PosteriorStream(model, rate), wave, [rate // 100, rate // 7])
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4)


# ---------------------------------------------------------------- refusals and bad input


def test_a_bidirectional_model_is_refused():
    cfg = ModelConfig(conv_channels=[4], conv_kernels=[[3, 3]], conv_strides=[[1, 1]], gru_layers=1, gru_hidden=8)
    model = asr.ASRModel(DeepSpeech2(cfg), asr.Vocabulary())
    with pytest.raises(OptionsError, match="cannot stream: its GRUs are bidirectional"):
        model.stream()


def test_bad_options_and_input_are_clear_errors():
    model = asr.ASRModel(random_model(), asr.Vocabulary())
    with pytest.raises(OptionsError, match=r"unknown stream option 'endpoint_second' \(did you mean endpoint_seconds"):
        model.stream(endpoint_second=1.0)
    with pytest.raises(OptionsError, match="endpoint_seconds: must be a number > 0"):
        model.stream(endpoint_seconds=0)
    with pytest.raises(OptionsError, match="sample_rate must be a whole number"):
        model.stream(0)
    with pytest.raises(OptionsError, match="beam_size must be"):
        model.stream(decoder="beam", beam_size=0)
    streamer = model.stream()
    with pytest.raises(AudioError, match="<stream>: audio contains NaN"):
        streamer.feed(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(AudioError, match=r"<stream>: expected samples of shape \(time,\) or \(time, channels\)"):
        streamer.feed(np.zeros((2, 2, 2), dtype=np.float32))
    assert streamer.feed(np.zeros(0, dtype=np.float32)) == []
    streamer.finish()
    with pytest.raises(StreamError, match="this stream is finished"):
        streamer.feed(np.zeros(160, dtype=np.float32))


# ---------------------------------------------------------------- text from a trained model


@pytest.fixture(scope="session")
def tone_lm_folder(tmp_path_factory):
    from asr.lm.kenlm_tools import kenlm_tools, missing_build_requirements
    from asr.lm.language_model import build_lm

    require_system_tools(missing_build_requirements())
    kenlm_tools()
    text = tmp_path_factory.mktemp("streaming_lm_text") / "text.txt"
    text.write_text("\n".join(TEXTS * 20 + ["a bad egg", "dig a hole", "the bad one"] * 5) + "\n")
    out = tmp_path_factory.mktemp("streaming_lm") / "tones"
    build_lm([text], out, order=3, prune=[0, 0, 0])
    return out


def stream_events(model, wave, chunk_samples: int, **options) -> list:
    streamer = model.stream(16_000, **options)
    events = []
    for i in range(0, len(wave), chunk_samples):
        events += streamer.feed(wave[i: i + chunk_samples])
    return events + streamer.finish()


def same_words(got, expected) -> bool:
    return [(w.word, w.start, w.end) for w in got] == [(w.word, w.start, w.end) for w in expected] and all(
        abs(a.confidence - b.confidence) < 1e-3 for a, b in zip(got, expected))


@pytest.mark.parametrize("chunk_ms", [10, 160, 1000])
def test_streamed_text_equals_offline_transcribe(streaming_model, chunk_ms):
    model = asr.load_model(streaming_model, device="cpu", backend="torch", precision="fp32")
    for i, text in enumerate(TEXTS):
        wave = tone_speech(text, seed=i)
        expected = model.transcribe(wave, sample_rate=16_000)
        events = stream_events(model, wave, 16 * chunk_ms)
        finals = [e for e in events if e.kind == "final"]
        assert expected.text == text and [e.text for e in finals] == [text]
        assert same_words(finals[0].words, expected.words)
        assert events[-1] is finals[0] and finals[0].start == 0 and finals[0].end == expected.duration
        partials = [e for e in events if e.kind == "partial"]
        if chunk_ms < 1000:  # the text shows while it is spoken, each partial the start of the final text
            assert partials and all(text.startswith(p.text) for p in partials)
            assert [p.end for p in partials] == sorted(p.end for p in partials) and partials[-1].end <= finals[0].end


def test_int16_and_stereo_chunks(streaming_model):
    model = asr.load_model(streaming_model, device="cpu", backend="torch", precision="fp32")
    wave = tone_speech(TEXTS[4], seed=4)
    pcm = np.round(wave * 32767).astype(np.int16)
    finals = [e for e in stream_events(model, np.stack([pcm, pcm], 1), 1000) if e.kind == "final"]
    assert [e.text for e in finals] == [TEXTS[4]]


def test_beam_search_streams_as_offline(streaming_model):
    model = asr.load_model(streaming_model, device="cpu", backend="torch", precision="fp32")
    for i, text in enumerate(TEXTS):
        wave = tone_speech(text, seed=i)
        expected = model.transcribe(wave, sample_rate=16_000, decoder="beam", lexicon=False)
        events = stream_events(model, wave, 160 * 16, decoder="beam", lexicon=False)
        finals = [e for e in events if e.kind == "final"]
        assert [e.text for e in finals] == [expected.text] == [text]
        assert same_words(finals[0].words, expected.words)


def test_beam_search_with_the_lm_streams_as_offline(streaming_model, tone_lm_folder):
    model = asr.load_model(streaming_model, device="cpu", backend="torch", precision="fp32", lm=tone_lm_folder)
    for i, text in enumerate(TEXTS):
        wave = tone_speech(text, seed=i)
        expected = model.transcribe(wave, sample_rate=16_000, decoder="beam", lm_weight=1.0)
        finals = [e for e in stream_events(model, wave, 100 * 16, decoder="beam", lm_weight=1.0) if e.kind == "final"]
        assert [e.text for e in finals] == [expected.text] and expected.text.startswith(text.split()[0])
        assert same_words(finals[0].words, expected.words)


@pytest.mark.parametrize("decoder", ["greedy", "beam"])
def test_a_pause_ends_a_segment(streaming_model, decoder):
    model = asr.load_model(streaming_model, device="cpu", backend="torch", precision="fp32")
    options = {"decoder": decoder, "lexicon": False}
    for a, b in [(2, 1), (3, 5)]:
        first = tone_speech(TEXTS[a], seed=a)
        pause = 0.003 * np.random.default_rng(a).standard_normal(24_000).astype(np.float32)  # 1.5 s, faint hiss
        wave = np.concatenate([first, pause, tone_speech(TEXTS[b], seed=b)])
        finals = [e for e in stream_events(model, wave, 2560, **options) if e.kind == "final"]
        assert [e.text for e in finals] == [TEXTS[a], TEXTS[b]]
        assert finals[0].end <= finals[1].start and finals[1].end == round(len(wave) / 16_000, 3)
        assert finals[0].words[-1].end < len(first) / 16_000
        assert finals[1].words[0].start > (len(first) + len(pause)) / 16_000
        # a longer endpoint waits through the pause: one segment
        finals = [e for e in stream_events(model, wave, 2560, endpoint_seconds=2.0, **options) if e.kind == "final"]
        assert len(finals) == 1 and finals[0].text.startswith(TEXTS[a])


def test_a_long_segment_ends_at_its_next_sure_blank(streaming_model):
    model = asr.load_model(streaming_model, device="cpu", backend="torch", precision="fp32")
    wave = tone_speech("dig a hole", seed=4)
    finals = [e for e in stream_events(model, wave, 1600, max_segment_seconds=0.3) if e.kind == "final"]
    assert len(finals) >= 2 and all(a.end == b.start for a, b in zip(finals, finals[1:]))
    assert "".join(e.text for e in finals).replace(" ", "") == "digahole"  # cut between letters, none lost


# ---------------------------------------------------------------- asr transcribe --stream


def test_cli_streams_a_file_and_raw_pcm_on_stdin(streaming_model, tmp_path):
    import soundfile as sf

    wave = tone_speech(TEXTS[2], seed=2)
    path = tmp_path / "bad_egg.wav"
    sf.write(path, wave, 16_000)
    command = [sys.executable, "-m", "asr.cli", "transcribe", "--stream", "--model", str(streaming_model)]
    out = subprocess.run(command + [str(path), "--realtime"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == f"final\t{TEXTS[2]}" and any(line.startswith("partial\t") for line in lines[:-1])
    pcm = np.round(wave * 32767).astype("<i2").tobytes()
    out = subprocess.run(command + ["-", "--format", "json"], input=pcm, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    events = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert events[-1]["kind"] == "final" and events[-1]["text"] == TEXTS[2]
    assert [w["word"] for w in events[-1]["words"]] == TEXTS[2].split()
    out = subprocess.run(command + [str(path), "--rate", "8000"], capture_output=True, text=True)
    assert out.returncode == 2 and "--rate is for raw PCM on standard input" in out.stderr
