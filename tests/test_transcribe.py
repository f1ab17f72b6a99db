import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import asr
from asr.checkpoint import CheckpointError

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
    result = model.transcribe(tone_speech("dig a hole"), sample_rate=16000)
    assert [w.word for w in result.words] == ["dig", "a", "hole"]
    times = [t for w in result.words for t in (w.start, w.end)]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= result.duration
    # 'dig' spans 3 letters of 70 ms after 100 ms of silence
    assert abs(result.words[0].start - 0.1) < 0.1 and abs(result.words[0].end - 0.31) < 0.1
    assert all(0 < w.confidence <= 1 for w in result.words)


def test_long_audio_is_windowed_and_stitched(trained_tiny_model):
    model = asr.load_model(trained_tiny_model)
    texts = TEXTS * 3
    gap = np.zeros(8000, dtype=np.float32)
    wave = np.concatenate([np.concatenate([tone_speech(t, seed=i), gap]) for i, t in enumerate(texts)])
    whole = model.transcribe(wave, sample_rate=16000, chunk_seconds=1000)
    windowed = model.transcribe(wave, sample_rate=16000, chunk_seconds=6, overlap_seconds=2)
    assert len(wave) / 16000 > 3 * 6
    assert windowed.text == whole.text
    assert len(windowed.words) == len(whole.words)
    for a, b in zip(windowed.words, whole.words):
        assert abs(a.start - b.start) <= 0.04
    lp_whole = model.posteriors([torch.from_numpy(wave)], asr.TranscribeOptions(chunk_seconds=1000))[0]
    lp_win = model.posteriors([torch.from_numpy(wave)], asr.TranscribeOptions(chunk_seconds=6, overlap_seconds=2))[0]
    assert abs(len(lp_whole) - len(lp_win)) <= 1


def test_load_model_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("ASR_MODEL", raising=False)
    with pytest.raises(FileNotFoundError, match="ASR_MODEL"):
        asr.load_model()
    with pytest.raises(CheckpointError, match="not found"):
        asr.load_model(tmp_path)
    with pytest.raises(ValueError, match="decoder"):
        asr.ASRModel.transcribe(None, "x.wav", decoder="nope")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "asr.cli", *map(str, args)], capture_output=True, text=True, env=env)


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


def test_cli_help_for_every_command():
    for cmd in ("prepare", "train", "evaluate", "transcribe"):
        out = _cli(cmd, "--help")
        assert out.returncode == 0 and "usage: asr " + cmd in out.stdout
