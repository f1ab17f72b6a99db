import numpy as np
import pytest
import soundfile as sf
import torch

from asr.audio import SAMPLE_RATE, AudioError, audio_duration, load_audio


def sine(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("fmt, subtype, rate, channels", [
    ("WAV", "PCM_16", 16000, 1), ("WAV", "FLOAT", 44100, 2), ("FLAC", "PCM_16", 8000, 1),
    ("OGG", "VORBIS", 22050, 2), ("OGG", "OPUS", 48000, 1), ("MP3", "MPEG_LAYER_III", 32000, 1),
])
def test_formats_rates_and_channels_become_16k_mono(tmp_path, fmt, subtype, rate, channels):
    wave = sine(1.0, rate)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, data, rate, format=fmt, subtype=subtype)
    out = load_audio(path)
    assert out.dtype == torch.float32 and out.ndim == 1
    assert abs(len(out) - SAMPLE_RATE) < 0.03 * SAMPLE_RATE  # codecs may pad a little
    assert abs(audio_duration(path) - 1.0) < 0.05
    # the tone survives: the spectrum peaks near 440 Hz
    spectrum = torch.fft.rfft(out).abs()
    assert abs(int(spectrum.argmax()) * SAMPLE_RATE / len(out) - 440) < 5


def test_array_input_needs_and_uses_sample_rate():
    wave = sine(0.5, 8000)
    with pytest.raises(AudioError, match="sample_rate"):
        load_audio(wave)
    assert len(load_audio(wave, 8000)) == 8000
    stereo_channels_first = torch.from_numpy(np.stack([wave, wave]))
    assert len(load_audio(stereo_channels_first, 8000)) == 8000
    int16 = (wave * 32767).astype(np.int16)
    assert torch.allclose(load_audio(int16, 8000), load_audio(wave, 8000), atol=1e-3)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match=r"nothere\.wav: file not found"):
        load_audio(tmp_path / "nothere.wav")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: file is empty"):
        load_audio(path)


def test_not_audio(tmp_path):
    path = tmp_path / "notes.flac"
    path.write_text("this is not audio at all " * 20)
    with pytest.raises(AudioError, match=r"notes\.flac: "):
        load_audio(path)


def test_header_without_samples(tmp_path):
    path = tmp_path / "nosamples.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"nosamples\.wav: audio is empty"):
        load_audio(path)


def test_non_finite_samples(tmp_path):
    wave = sine(0.5, 16000)
    wave[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav: audio contains NaN"):
        load_audio(path)
    with pytest.raises(AudioError, match="infinite"):
        load_audio(np.full(16000, np.inf, dtype=np.float32), 16000)


def test_too_short(tmp_path):
    path = tmp_path / "blip.wav"
    sf.write(path, sine(0.01, 16000), 16000)
    with pytest.raises(AudioError, match=r"blip\.wav: audio is too short"):
        load_audio(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(path, sine(1.0, 16000), 16000, format="FLAC")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(AudioError, match=r"cut\.flac"):
        load_audio(path)
