import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import asr
from asr.checkpoint import CheckpointError
from asr.model import ModelConfig

from .conftest import TEXTS, tone_speech


def test_inputs_path_array_tensor_and_list(trained_tiny_model, tone_corpus):
    model = asr.load_model(trained_tiny_model, device="cpu")
    path = tone_corpus.parent / "utt2.wav"
    wave = tone_speech(TEXTS[2], seed=2)
    by_path = model.transcribe(str(path))
    assert by_path.text == TEXTS[2]
    assert model.transcribe(wave, sample_rate=16000).text == TEXTS[2]
    assert model.transcribe(torch.from_numpy(wave), sample_rate=16000).text == TEXTS[2]
    # 44.1 kHz stereo file: resampled and mixed down
    stereo = tone_corpus.parent / "stereo.wav"
    up = torch.from_numpy(wave)
    import torchaudio.functional as AF
    up = AF.resample(up, 16000, 44100).numpy()
    sf.write(stereo, np.stack([up, up], 1), 44100)
    assert model.transcribe(stereo).text == TEXTS[2]
    batch = model.transcribe([path, wave], sample_rate=16000)
    assert [r.text for r in batch] == [TEXTS[2]] * 2


def test_word_times_are_ordered_and_inside_the_audio(trained_tiny_model):
    model = asr.load_model(trained_tiny_model)
    result = model.transcribe(tone_speech("dig a hole", seed=4), sample_rate=16000)
    assert [w.word for w in result.words] == ["dig", "a", "hole"]
    times = [t for w in result.words for t in (w.start, w.end)]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= result.duration
    # 'dig' spans 3 letters of 70 ms after 100 ms of silence
    assert abs(result.words[0].start - 0.1) < 0.1 and abs(result.words[0].end - 0.31) < 0.1
    assert all(0 < w.confidence <= 1 for w in result.words)


class PositionModel(torch.nn.Module):
    """Stand-in acoustic model whose output frame t carries the input sample at t * samples-per-frame."""

    def __init__(self):
        super().__init__()
        self.config = ModelConfig()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, waves, lengths):
        frames = -(-(lengths // self.config.features.hop_length + 1) // self.config.time_stride)
        step = self.config.features.hop_length * self.config.time_stride
        idx = torch.minimum(torch.arange(int(frames.max()))[None, :] * step, lengths[:, None] - 1)
        return waves.gather(1, idx).unsqueeze(-1).repeat(1, 1, 3), frames


@pytest.mark.parametrize("seconds", [5.0, 6.0, 17.3, 41.0])
def test_windows_are_stitched_at_the_right_frames(seconds):
    model = asr.ASRModel(PositionModel(), asr.Vocabulary())
    wave = torch.arange(int(seconds * 16000), dtype=torch.float32)
    whole = model.posteriors([wave], asr.TranscribeOptions(chunk_seconds=1000))[0]
    windowed = model.posteriors([wave], asr.TranscribeOptions(chunk_seconds=6, overlap_seconds=2))[0]
    assert len(whole) == len(windowed)
    assert torch.equal(whole, windowed)  # every frame comes from the window that holds its sample


def test_long_audio_end_to_end(trained_tiny_model):
    model = asr.load_model(trained_tiny_model)
    gap = np.zeros(8000, dtype=np.float32)
    wave = np.concatenate([np.concatenate([tone_speech(t, seed=i), gap]) for i, t in enumerate(TEXTS * 4)])
    result = model.transcribe(wave, sample_rate=16000, chunk_seconds=6, overlap_seconds=2)
    assert len(wave) / 16000 > 3 * 6 and result.duration == round(len(wave) / 16000, 3)
    times = [t for w in result.words for t in (w.start, w.end)]
    assert result.words and times == sorted(times) and times[-1] <= result.duration
    assert times[-1] > result.duration - 3  # words found in the last window too


def test_load_model_errors(tmp_path, monkeypatch, trained_tiny_model):
    monkeypatch.delenv("ASR_MODEL", raising=False)
    monkeypatch.setattr("asr.serve.packaging.DEFAULT_MODEL_DIR", tmp_path / "no_default_model")
    with pytest.raises(FileNotFoundError, match="ASR_MODEL"):
        asr.load_model()
    with pytest.raises(CheckpointError, match="not found"):
        asr.load_model(tmp_path)
    with pytest.raises(ValueError, match="decoder"):
        asr.load_model(trained_tiny_model).transcribe("x.wav", decoder="nope")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "asr.cli", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_cli_transcribe_formats_and_bad_input(trained_tiny_model, tone_corpus, tmp_path):
    path = tone_corpus.parent / "utt4.wav"
    out = _cli("transcribe", path, "--model", trained_tiny_model)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == TEXTS[4]
    out = _cli("transcribe", path, "--model", trained_tiny_model, "--format", "json")
    record = json.loads(out.stdout)
    assert record["text"] == TEXTS[4] and len(record["words"]) == 3
    srt = _cli("transcribe", path, "--model", trained_tiny_model, "--format", "srt").stdout
    assert srt.startswith("1\n00:00:00,") and "dig a hole" in srt
    vtt = _cli("transcribe", path, "--model", trained_tiny_model, "--format", "vtt").stdout
    assert vtt.startswith("WEBVTT\n\n00:00:00.")
    bad = tmp_path / "bad.mp3"
    bad.write_text("not audio")
    out = _cli("transcribe", bad, path, "--model", trained_tiny_model)
    assert out.returncode == 1 and "bad.mp3" in out.stderr and TEXTS[4] in out.stdout
    out = _cli("transcribe", path, "--model", tmp_path)
    assert out.returncode == 2 and "model.safetensors: not found" in out.stderr


@pytest.mark.slow
def test_cli_help_for_every_command():
    for cmd in ("prepare", "train", "evaluate", "transcribe"):
        out = _cli(cmd, "--help")
        assert out.returncode == 0 and "usage: asr " + cmd in out.stdout
