"""Shared fixtures: tone 'speech' that a tiny model can learn, and small corpora in real layouts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import soundfile as sf

from asr.text import ENGLISH_CHARACTERS
from asr.train.corpora import DIGIT_WORDS

SHARED_DATA = Path(os.environ.get("ASR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TEXTS = ["one two", "cab", "bad egg", "fee", "dig a hole", "ace"]


def tone_speech(text: str, sample_rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Each letter a 70 ms tone of its own pitch, spaces 120 ms of silence, a little noise."""
    rng = np.random.default_rng(seed)
    pieces = [np.zeros(int(0.1 * sample_rate))]
    for ch in text:
        n = int((0.12 if ch == " " else 0.07) * sample_rate)
        t = np.arange(n) / sample_rate
        if ch == " ":
            pieces.append(np.zeros(n))
        else:
            freq = 250.0 + 110.0 * ENGLISH_CHARACTERS.index(ch)
            pieces.append(0.4 * np.sin(2 * np.pi * freq * t) * np.hanning(n))
    pieces.append(np.zeros(int(0.1 * sample_rate)))
    wave = np.concatenate(pieces)
    return (wave + 0.003 * rng.standard_normal(len(wave))).astype(np.float32)


def write_tone_corpus(folder: Path, texts: list[str] = TEXTS, name: str = "manifest.jsonl", seed: int = 0) -> Path:
    """Tone-speech wav files (utt{i}.wav) and a JSONL manifest over them; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / name
    with open(manifest, "w") as f:
        for i, text in enumerate(texts):
            wave = tone_speech(text, seed=seed + i)
            path = folder / f"utt{i}.wav"
            sf.write(path, wave, 16_000)
            f.write(json.dumps({"audio_filepath": path.name, "duration": len(wave) / 16_000, "text": text}) + "\n")
    return manifest


def write_fake_fsdd(folder: Path, takes: int, speakers: tuple[str, ...] = ("ann", "bob", "theo")) -> Path:
    """An FSDD-layout folder (recordings/{digit}_{speaker}_{take}.wav, 8 kHz tone speech); returns it."""
    rec = folder / "recordings"
    rec.mkdir(parents=True)
    for speaker in speakers:
        for d, word in enumerate(DIGIT_WORDS):
            for take in range(takes):
                sf.write(rec / f"{d}_{speaker}_{take}.wav", tone_speech(word, 8000, seed=take), 8000)
    return folder


def require_system_tools(missing: list[str]) -> None:
    """Skip when system packages are missing, or fail under ASR_STRICT_TESTS (CI must not skip)."""
    if not missing:
        return
    message = f"missing {missing} (tests/install-system-packages.sh installs them)"
    if os.environ.get("ASR_STRICT_TESTS"):
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def chromium_path() -> str:
    """Debian's chromium, which the browser tests drive through Playwright (skipped, or failed in CI, without it)."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    require_system_tools([] if path else ["chromium"])
    return path


def write_tone_files(folder: Path, seed: int = 100) -> dict[str, Path]:
    """Each of TEXTS as tone speech in its own 16 kHz WAV file in `folder` (tones0.wav, ...), by text."""
    files = {}
    for i, text in enumerate(TEXTS):
        files[text] = folder / f"tones{i}.wav"
        sf.write(files[text], tone_speech(text, seed=seed + i), 16_000)
    return files


def manifest_text_with_absolute_paths(manifest: Path) -> str:
    """A tone-corpus manifest's lines with its audio paths made absolute (to combine or move manifests)."""
    return manifest.read_text().replace('"utt', f'"{manifest.parent}/utt')


@pytest.fixture(scope="session")
def tone_corpus(tmp_path_factory) -> Path:
    return write_tone_corpus(tmp_path_factory.mktemp("tones"))


TINY_OVERRIDES = [
    "model.conv_channels=[8]", "model.conv_kernels=[[5,11]]", "model.conv_strides=[[2,2]]",
    "model.gru_layers=1", "model.gru_hidden=96", "model.dropout=0.0", "model.features.n_mels=40",
    "model.features.freq_masks=0", "model.features.time_masks=0",
    "data.max_batch_seconds=100", "data.num_workers=0",
    "train.lr=5e-3", "train.warmup_steps=10", "train.min_lr_ratio=0.2", "train.log_every_steps=50",
]


@pytest.fixture(scope="session")
def trained_tiny_model(tone_corpus, tmp_path_factory) -> Path:
    """A tiny model trained to zero error on the tone corpus (shared by several tests)."""
    from asr.config import load_config
    from asr.train.trainer import Trainer

    out = tmp_path_factory.mktemp("tiny_exp")
    # the tone corpus plus other noise realisations of the same texts, and noise augmentation:
    # the model must learn the tones, not memorise six waveforms
    more = write_tone_corpus(tmp_path_factory.mktemp("tones_more"), seed=100)
    train = tone_corpus.parent / "train.jsonl"
    train.write_text(tone_corpus.read_text() + manifest_text_with_absolute_paths(more))
    config = load_config(None, TINY_OVERRIDES + ["train.epochs=100", "train.eval_every_steps=10",
                                                 "data.noise_snr_db=[15,40]", "data.noise_prob=0.7"])
    result = Trainer(config, train, tone_corpus, out, progress=False).fit()
    assert result.best_wer == 0.0, f"tiny model did not overfit (best WER {result.best_wer})"
    return result.best_dir


def after_step(trainer, step: int, action: Callable[[], None]):
    """Make `trainer` call `action()` (e.g. raise, as a kill would) once step `step` is done, its logs and
    checkpoint written, before the next step starts."""
    train_step = trainer.train_step

    def step_then_act(batches):
        if trainer.step == step:
            action()
        return train_step(batches)
    trainer.train_step = step_then_act
    return trainer


def kaldi_split(folder: Path, texts: list[str]) -> None:
    """A Kaldi data folder (text, wav.scp, utt2spk) of Opus tone speech, as speechocean762 ships."""
    (folder / "audio").mkdir(parents=True)
    with open(folder / "text", "w") as t, open(folder / "wav.scp", "w") as w, open(folder / "utt2spk", "w") as s:
        for i, text in enumerate(texts):
            utt = f"{folder.name}{i:04d}"
            sf.write(folder / "audio" / f"{utt}.opus", tone_speech(text.lower(), seed=i), 16000, format="OGG",
                     subtype="OPUS")
            t.write(f"{utt} {text}\n")
            w.write(f"{utt} audio/{utt}.opus\n")
            s.write(f"{utt} spk{i % 3}\n")


@pytest.fixture(scope="session")
def streaming_model(tone_corpus, tmp_path_factory):
    """A tiny unidirectional model (lookahead 2, global features) trained to zero error on the tone corpus."""
    from asr.config import load_config
    from asr.train.trainer import Trainer

    more = write_tone_corpus(tmp_path_factory.mktemp("tones_more_streaming"), seed=100)
    train = tone_corpus.parent / "train_streaming.jsonl"
    train.write_text(tone_corpus.read_text() + manifest_text_with_absolute_paths(more))
    config = load_config(None, TINY_OVERRIDES + [
        "model.bidirectional=false", "model.lookahead_frames=2", "model.features.normalization=global",
        "train.epochs=100", "train.eval_every_steps=10", "data.noise_snr_db=[15,40]", "data.noise_prob=0.7"])
    result = Trainer(config, train, tone_corpus, tmp_path_factory.mktemp("streaming_exp"), progress=False).fit()
    assert result.best_wer == 0.0, f"the streaming model did not learn the tones (best WER {result.best_wer})"
    return result.best_dir


# ---------------------------------------------------------------- the reliability table
# Tests of bad input record (case, interface, outcome) rows; with ASR_RELIABILITY_TABLE=FILE the session
# writes them as the markdown table of docs/reliability.md.
RELIABILITY_ROWS: list[tuple[str, str, str]] = []


@pytest.fixture
def reliability():
    """record(case, interface, outcome): one row of the reliability table; call it after the assertions."""
    return lambda case, interface, outcome: RELIABILITY_ROWS.append((case, interface, outcome))


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("ASR_RELIABILITY_TABLE")
    if not target or not RELIABILITY_ROWS:
        return
    lines = ["| case | interface | outcome |", "|---|---|---|"]
    lines += [f"| {c} | {i} | {o.replace('|', '/')} |" for c, i, o in sorted(set(RELIABILITY_ROWS))]
    Path(target).write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def served_demo(args: list[str], log: Path) -> Iterator[str]:
    """`asr demo ARGS` on a free port of 127.0.0.1, its output in `log`; yields its URL, stops it at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "asr.cli", "demo", *args, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the demo did not start:\n{log.read_text()}")
                time.sleep(0.5)
        yield url
        assert proc.poll() is None, f"the demo server died:\n{log.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
