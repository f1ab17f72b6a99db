"""Reliability of audio input, transcription options and scoring output: the API raises AudioError (an
ASRError) naming the file, the CLI exits non-zero without a traceback, silence and noise give no words,
long files take bounded memory, and results already written survive a full disk."""

import errno
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import asr
from asr.audio import AudioWarning, load_audio
from asr.checkpoint import CheckpointError
from asr.errors import ASRError, OptionsError

from .conftest import SHARED_DATA, TEXTS, tone_speech

SHIPPED = Path(asr.__file__).parent / "default_model"


def _cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr.cli", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def _assert_clean_failure(out: subprocess.CompletedProcess, *names: str) -> None:
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    for name in names:
        assert name in out.stderr, out.stderr


@pytest.fixture(scope="module")
def tiny(trained_tiny_model):
    return asr.load_model(trained_tiny_model, device="cpu")


@pytest.fixture(scope="module")
def shipped():
    return asr.load_model(SHIPPED, device="cpu")


def _speech() -> np.ndarray:
    """A tone utterance the tiny model knows ("dig a hole"), at 16 kHz."""
    return tone_speech(TEXTS[4], seed=4)


# ---------------------------------------------------------------- files that are not usable audio
def _write_bad(kind: str, folder: Path) -> Path:
    good = folder / "good.flac"
    sf.write(good, _speech(), 16000)
    if kind == "empty file":
        (path := folder / "empty.wav").write_bytes(b"")
    elif kind == "header with 0 samples":
        sf.write(path := folder / "nosamples.wav", np.zeros(0, np.float32), 16000)
    elif kind == "text named .wav":
        (path := folder / "notes.wav").write_text("this is a shopping list, not audio\n" * 20)
    elif kind == "FLAC cut in its first frame":
        (path := folder / "cut.flac").write_bytes(good.read_bytes()[:200])
    elif kind == "NaN samples":
        wave = _speech()
        wave[100] = np.nan
        sf.write(path := folder / "nan.wav", wave, 16000, subtype="FLOAT")
    elif kind == "inf samples":
        wave = _speech()
        wave[-5] = np.inf
        sf.write(path := folder / "inf.wav", wave, 16000, subtype="FLOAT")
    elif kind == "a directory":
        (path := folder / "folder.wav").mkdir()
    elif kind == "a missing path":
        path = folder / "nowhere.wav"
    elif kind == "10 ms clip":
        sf.write(path := folder / "blip.wav", _speech()[:160], 16000)
    else:
        raise AssertionError(kind)
    return path


BAD = {"empty file": "file is empty", "header with 0 samples": "audio is empty", "text named .wav": "not an audio file",
       "FLAC cut in its first frame": "truncated or corrupt FLAC", "NaN samples": "NaN or infinite",
       "inf samples": "NaN or infinite", "a directory": "is a directory", "a missing path": "file not found",
       "10 ms clip": "too short"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD))
def test_unusable_audio_is_named_with_its_problem(kind, tiny, trained_tiny_model, tmp_path, reliability):
    path = _write_bad(kind, tmp_path)
    with pytest.raises(asr.AudioError, match=rf"{path.name}: .*{BAD[kind]}") as error:
        tiny.transcribe(path)
    assert isinstance(error.value, ASRError)
    reliability(kind, "API", f"AudioError: '{error.value.problem}'")
    out = _cli("transcribe", path, tmp_path / "good.flac", "--model", trained_tiny_model)
    _assert_clean_failure(out, path.name, BAD[kind])
    assert out.returncode == 1 and TEXTS[4] in out.stdout  # the good file after it is still transcribed
    reliability(kind, "CLI", f"exit 1, '{path.name}: {BAD[kind]} ...', the other files transcribed")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_truncated_file_gives_its_decodable_part_and_a_warning(fmt, tiny, trained_tiny_model, tmp_path, reliability):
    wave = np.concatenate([_speech(), np.zeros(16000 * 3, np.float32), _speech()])
    whole = tmp_path / f"whole.{fmt.lower()}"
    sf.write(whole, wave, 16000, format=fmt, **({"subtype": "OPUS"} if fmt == "OGG" else {}))
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.warns(AudioWarning, match=rf"cut\.{fmt.lower()}: truncated or corrupt"):
        result = tiny.transcribe(cut)
    assert 0.3 < result.duration < len(wave) / 16000 - 1.0
    reliability(f"truncated {'Opus' if fmt == 'OGG' else fmt}", "API",
                f"AudioWarning, the {result.duration:.1f} s that decode are transcribed")
    out = _cli("transcribe", cut, "--model", trained_tiny_model)
    assert out.returncode == 0 and "warning:" in out.stderr and "Traceback" not in out.stderr, out.stderr
    reliability(f"truncated {'Opus' if fmt == 'OGG' else fmt}", "CLI", "exit 0, one warning line, the decodable part")


@pytest.mark.parametrize("subtype,rate,channels", [("PCM_U8", 16000, 1), ("FLOAT", 16000, 1), ("PCM_16", 8000, 1),
                                                   ("PCM_16", 44100, 1), ("PCM_16", 48000, 2)])
def test_sample_types_rates_and_channels_give_the_right_text(subtype, rate, channels, tiny, tmp_path, reliability):
    import torch
    import torchaudio.functional as AF

    wave = AF.resample(torch.from_numpy(_speech()), 16000, rate).numpy()
    data = np.stack([wave] * channels, 1) if channels > 1 else wave
    path = tmp_path / f"x_{subtype}_{rate}_{channels}.wav"
    sf.write(path, data, rate, subtype=subtype)
    assert tiny.transcribe(path).text == TEXTS[4]
    reliability(f"{subtype} {rate / 1000:g} kHz {'stereo' if channels > 1 else 'mono'}", "API", "right transcript")


# ---------------------------------------------------------------- silence and noise: never invented words
NOISES = {
    "10 s of digital silence": lambda rng: np.zeros(160_000, np.float32),
    "10 s of noise at -90 dBFS": lambda rng: (10 ** (-90 / 20) * rng.standard_normal(160_000)).astype(np.float32),
    "10 s of white noise at -20 dBFS": lambda rng: (0.1 * rng.standard_normal(160_000)).astype(np.float32),
    "10 s of loud white noise (clipped)":
        lambda rng: np.clip(0.5 * rng.standard_normal(160_000), -1, 1).astype(np.float32),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NOISES))
def test_silence_and_noise_give_no_words(name, shipped, tmp_path, reliability):
    wave = NOISES[name](np.random.default_rng(0))
    path = tmp_path / "noise.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    for decoder in ("greedy", "beam"):
        result = shipped.transcribe(path, decoder=decoder)
        assert result.text == "" and result.words == [], (decoder, result.text)
    reliability(name, "API (greedy, beam + LM)", "empty transcript")
    out = _cli("transcribe", path, "--decoder", "beam", "--model", SHIPPED)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout
    reliability(name, "CLI", "exit 0, empty transcript")


@pytest.mark.slow
def test_speech_check_keeps_every_word_of_real_speech(shipped, reliability):
    dev = SHARED_DATA / "speechocean762" / "dev"
    if not (dev / "wav.scp").is_file():
        pytest.skip(f"speechocean762 dev not found under {SHARED_DATA} (set ASR_SHARED_DATA)")
    lines = (dev / "wav.scp").read_text().split("\n")[:40]
    paths = [str(dev / line.split()[1]) for line in lines if line.strip()]
    checked = shipped.transcribe(paths)
    unchecked = shipped.transcribe(paths, speech_check=False)
    assert [r.text for r in checked] == [r.text for r in unchecked]
    assert sum(len(r.words) for r in checked) > 100
    reliability("real speech (40 speechocean762 dev files)", "API", "the speech check drops no word")


def test_heavily_clipped_speech_is_transcribed(shipped, reliability):
    dev = SHARED_DATA / "speechocean762" / "dev"
    if not (dev / "wav.scp").is_file():
        pytest.skip(f"speechocean762 dev not found under {SHARED_DATA} (set ASR_SHARED_DATA)")
    from asr.metrics import error_rates

    lines = [line.split() for line in (dev / "wav.scp").read_text().split("\n")[:20] if line.strip()]
    texts = dict(line.split(maxsplit=1) for line in (dev / "text").read_text().splitlines() if line.strip())
    waves = [load_audio(dev / path) for _, path in lines]
    refs = [texts[utt] for utt, _ in lines]
    clean = error_rates(refs, [r.text for r in shipped.transcribe(waves, sample_rate=16000, decoder="greedy")]).cer
    clipped = [(w / w.abs().max() * 10).clamp(-1, 1) for w in waves]  # 20 dB into clipping
    hyps = shipped.transcribe(clipped, sample_rate=16000, decoder="greedy")
    cer = error_rates(refs, [r.text for r in hyps]).cer
    assert all(r.words for r in hyps) and cer < clean + 0.3, (clean, cer)  # it costs CER; it must not break
    # the model's own decoder (beam + LM) does no worse on the clipped speech than greedy does
    default = shipped.transcribe(clipped, sample_rate=16000)
    default_cer = error_rates(refs, [r.text for r in default]).cer
    assert all(r.words for r in default) and default_cer <= cer, (cer, default_cer)
    reliability("speech clipped 20 dB (20 speechocean762 dev files)", "API",
                f"transcribed: CER {cer:.0%} greedy against {clean:.0%} unclipped; {default_cer:.0%} beam + LM")


# ---------------------------------------------------------------- long files: memory independent of length
PEAK_RSS = textwrap.dedent("""
    import resource, sys, asr
    model = asr.load_model(sys.argv[1], device="cpu")
    result = model.transcribe(sys.argv[2])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, len(result.text), result.duration)
""")


def _write_long(path: Path, minutes: int) -> None:
    """Tone speech and pauses, written block by block (this process never holds the whole file)."""
    block = np.concatenate([np.concatenate([tone_speech(t, seed=i), np.zeros(8000, np.float32)])
                            for i, t in enumerate(TEXTS)])
    with sf.SoundFile(path, "w", 16000, 1, format="FLAC") as f:
        for _ in range(int(minutes * 60 * 16000 / len(block)) + 1):
            f.write(block)


@pytest.mark.slow
def test_peak_memory_of_a_one_hour_file_is_close_to_a_ten_minute_one(trained_tiny_model, tmp_path, reliability):
    peaks = {}
    for minutes in (10, 60):
        path = tmp_path / f"{minutes}.flac"
        _write_long(path, minutes)
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(trained_tiny_model), str(path)],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        rss, characters, duration = out.stdout.split()
        assert float(duration) >= minutes * 60 and int(characters) > minutes * 60  # text all along
        peaks[minutes] = int(rss)
        path.unlink()
    assert peaks[60] <= 1.5 * peaks[10], peaks
    reliability("a one-hour file", "API", f"finishes; peak RSS {peaks[60]} MB against {peaks[10]} MB for 10 minutes")


def test_a_long_file_read_in_windows_gives_what_the_whole_file_gives(tiny, tmp_path):
    path = tmp_path / "long.wav"
    _write_long(path, 1)
    options = {"chunk_seconds": 12, "overlap_seconds": 2}
    streamed = tiny.transcribe(path, **options)
    whole = tiny.transcribe(load_audio(path), sample_rate=16000, **options)
    assert streamed.text == whole.text and len(streamed.text) > 300
    assert [(w.start, w.end) for w in streamed.words] == [(w.start, w.end) for w in whole.words]


# ---------------------------------------------------------------- options, devices, model folders
@pytest.mark.slow
def test_bad_options_are_options_errors(tiny, trained_tiny_model, tone_corpus, reliability):
    path = tone_corpus.parent / "utt4.wav"
    with pytest.raises(OptionsError, match="chunk_seconds"):
        tiny.transcribe(path, chunk_seconds=4)
    with pytest.raises(OptionsError, match="did you mean chunk_seconds"):
        tiny.transcribe(path, chunk_second=10)
    assert tiny.options(hotwords="mark")[1].hotwords == ["mark"]
    reliability("chunk_seconds <= overlap, misspelt option", "API", "OptionsError naming the option")
    for args, problem in ((["--chunk-seconds", "4"], "chunk_seconds"), (["--chunk-seconds", "-1"], "chunk_seconds"),
                          (["--device", "cuda:7"], "cuda"), (["--device", "tpu"], "tpu")):
        out = _cli("transcribe", path, "--model", trained_tiny_model, *args)
        _assert_clean_failure(out, problem)
        assert out.returncode == 2
    reliability("--chunk-seconds <= 4, --device cuda without a GPU, unknown device", "CLI",
                "exit 2, one line naming the option")


def test_an_interrupted_swap_of_lm_is_undone_and_a_missing_lm_is_named(tmp_path, reliability):
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    (folder / "lm").rename(folder / "lm.old")  # killed between the two renames of write_dir_atomically
    model = asr.load_model(folder, device="cpu")
    assert model.lm is not None and model.decoding.lexicon and (folder / "lm").is_dir()
    reliability("interrupted swap of the model's lm/", "API", "put back on load; beam search uses the LM")
    shutil.rmtree(folder / "lm")
    with pytest.raises(CheckpointError, match=r"decoder\.json .*/lm is missing"):
        asr.load_model(folder, device="cpu")
    reliability("model folder whose lm/ is gone", "API", "CheckpointError: decoder.json tuned with an LM, lm/ missing")


@pytest.mark.parametrize("case, settings", [
    ("naming a decoder that does not exist", lambda tuned: {**tuned, "decoder": "beem"}),
    ("not a JSON object", lambda tuned: [tuned]),
])
def test_a_decoder_json_that_names_no_decoder_is_refused_by_name(case, settings, tmp_path, reliability):
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    (folder / "decoder.json").write_text(json.dumps(settings(json.loads((SHIPPED / "decoder.json").read_text()))))
    with pytest.raises(CheckpointError, match=r"decoder\.json: not valid decoder settings"):
        asr.load_model(folder, device="cpu")
    sf.write(tmp_path / "tone.wav", np.sin(np.arange(16000) * 0.05).astype(np.float32) * 0.3, 16000)
    out = _cli("transcribe", tmp_path / "tone.wav", "--model", folder)
    assert out.returncode == 2 and "decoder.json: not valid decoder settings" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    reliability(f"decoder.json {case}", "API, CLI", "CheckpointError / exit 2: '<folder>/decoder.json: not valid "
                "decoder settings (...)'")


def test_evaluate_on_a_full_disk_keeps_the_previous_results(trained_tiny_model, tone_corpus, tmp_path,
                                                             monkeypatch, reliability):
    from asr.serve import evaluate

    model = asr.load_model(trained_tiny_model, device="cpu")
    out = tmp_path / "eval"
    evaluate.evaluate_manifest(model, tone_corpus, out, progress=False)
    before = {name: (out / name).read_bytes() for name in ("hypotheses.jsonl", "summary.json")}
    written = []

    def fill_the_disk(ref, hyp):  # the disk fills up after a few lines of the new results
        written.append(ref)
        if len(written) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return 0.0

    monkeypatch.setattr(evaluate, "utterance_wer", fill_the_disk)
    with pytest.raises(ASRError, match="No space left on device"):
        evaluate.evaluate_manifest(model, tone_corpus, out, progress=False)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary left behind
    assert json.loads(before["summary.json"])["utterances"] == len(TEXTS)
    reliability("disk full while `asr evaluate --out` writes", "API", "ResultsError; previous results and summary kept")
