"""Bad data on the training and evaluation path: manifests, corpora, audio that breaks mid-run, untrainable text."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from asr.audio import AudioError
from asr.checkpoint import save_model
from asr.cli import main
from asr.config import load_config
from asr.manifest import ManifestError, check_audio_files, read_manifest
from asr.model import DeepSpeech2
from asr.serve.evaluate import evaluate_utterances
from asr.serve.transcribe import ASRModel
from asr.text import Vocabulary
from asr.train.corpora import CorpusError, prepare_kaldi, prepare_librispeech
from asr.train.trainer import Trainer

from .conftest import TINY_OVERRIDES, tone_speech, write_tone_corpus

QUICK = TINY_OVERRIDES + ["train.epochs=1", "train.eval_every_steps=0"]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Run `asr ARGV` in this process; (exit status, stderr). Any exception but SystemExit fails the test."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


def _add_line(manifest: Path, audio: Path | str, text: str, duration: float = 1.0) -> None:
    with open(manifest, "a") as f:
        f.write(json.dumps({"audio_filepath": str(audio), "duration": duration, "text": text}) + "\n")


def _copy(manifest: Path, name: str) -> Path:
    """A copy of a manifest beside it (the same audio), to change without changing the original."""
    copy = manifest.with_name(name)
    copy.write_text(manifest.read_text())
    return copy


def _nan_wav(path: Path) -> Path:
    """A float WAV with a valid header whose samples were overwritten with 0xff bytes (NaN): decoding fails."""
    sf.write(path, tone_speech("ace"), 16_000, subtype="FLOAT")
    data = bytearray(path.read_bytes())
    start = data.index(b"data") + 8
    data[start:] = b"\xff" * (len(data) - start)
    path.write_bytes(bytes(data))
    return path


def _tiny_model() -> DeepSpeech2:
    return DeepSpeech2(load_config(None, TINY_OVERRIDES).model)


# ---------------------------------------------------------------- audio checked before training starts
def test_missing_dev_audio_is_reported_before_training(tmp_path, capsys, reliability):
    train = write_tone_corpus(tmp_path / "train")
    dev = write_tone_corpus(tmp_path / "dev", name="dev.jsonl")
    (tmp_path / "dev" / "utt2.wav").unlink()
    _add_line(dev, tmp_path / "dev", "ace")  # a folder, not a file
    with pytest.raises(ManifestError, match=r"dev\.jsonl: 2 of 7 utterances have unusable audio: "
                                            r"line 3: \S*utt2\.wav: file not found; line 7: \S*dev: "):
        Trainer(load_config(None, QUICK), train, dev, tmp_path / "exp", progress=False)
    code, err = _cli(capsys, "train", "--train", str(train), "--dev", str(dev), "--out", str(tmp_path / "exp"),
                     "--no-progress", *QUICK)
    assert code == 2 and "line 3:" in err and "Traceback" not in err
    assert not (tmp_path / "exp" / "checkpoints").exists()  # found before the first step, not after an epoch
    reliability("missing dev audio file", "CLI", "exit 2 before training: 'dev.jsonl: 2 of 7 utterances have "
                                                 "unusable audio: line 3: .../utt2.wav: file not found; ...'")


def test_audio_check_gives_the_first_few_bad_lines_and_the_count(tmp_path, reliability):
    manifest = tmp_path / "m.jsonl"
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all")
    sf.write(tmp_path / "short.wav", tone_speech("")[:800], 16_000)  # 0.05 s
    for name in ["empty.wav", "text.wav", "short.wav"] + [f"gone{i}.wav" for i in range(5)]:
        _add_line(manifest, tmp_path / name, "ace")
    with pytest.raises(ManifestError) as error:
        check_audio_files(read_manifest(manifest), manifest)
    message = str(error.value)
    assert message.startswith(f"{manifest}: 8 of 8 utterances have unusable audio: line 1: ")
    assert "empty.wav: file is empty" in message and "text.wav: no readable audio header" in message
    assert "short.wav: audio is too short (0.050 s" in message and "gone1.wav: file not found" in message
    assert "gone2.wav" not in message and message.endswith("and 3 more")
    reliability("manifest with many unreadable audio files", "Python API",
                "ManifestError: 'm.jsonl: 8 of 8 utterances have unusable audio: line 1: ...; and 3 more'")


# ---------------------------------------------------------------- audio that fails to decode mid-run
def _train_log(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "train_log.csv")))


@pytest.mark.parametrize("overrides, empty_step", [
    (["data.max_batch_seconds=100"], False),  # the bad utterance shares a batch
    (["data.max_batch_seconds=0.8"], True),  # alone in its batch: a step with no utterance
    (["data.max_batch_seconds=0.8", "train.grad_accumulation=2"], False),  # an empty micro-batch beside a full one
])
def test_audio_failing_to_decode_in_a_worker_is_skipped_in_training(tmp_path, caplog, overrides, empty_step,
                                                                    reliability):
    dev = write_tone_corpus(tmp_path / "c")
    train = _copy(dev, "train.jsonl")
    _add_line(train, _nan_wav(tmp_path / "c" / "bad.wav"), "ace", duration=0.41)  # its header is fine
    config = load_config(None, QUICK + ["data.num_workers=1", "train.log_every_steps=1"] + overrides)
    trainer = Trainer(config, train, dev, tmp_path / "exp", progress=False)
    with caplog.at_level(logging.WARNING, logger="asr.train.trainer"):
        result = trainer.fit()
    assert trainer.skipped_utterances == 1 and result.steps == trainer.total_steps
    warnings = [r.getMessage() for r in caplog.records if "bad.wav" in r.getMessage()]
    assert len(warnings) == 1 and "skipped" in warnings[0] and "NaN" in warnings[0]
    assert any("no readable utterance, update skipped" in r.getMessage() for r in caplog.records) == empty_step
    assert all(math.isfinite(float(row["loss"])) for row in _train_log(tmp_path / "exp"))
    reliability("audio that fails to decode mid-training (loader worker)", "Python API",
                "utterance skipped and counted, warning '.../bad.wav: ... NaN ...; skipped'")


def test_audio_failing_to_decode_in_a_loader_thread_raises_audio_error_in_evaluation(tmp_path, reliability):
    manifest = write_tone_corpus(tmp_path / "c")
    _add_line(manifest, _nan_wav(tmp_path / "c" / "bad.wav"), "ace", duration=0.41)
    with pytest.raises(AudioError, match=r"bad\.wav: audio contains NaN"):
        evaluate_utterances(ASRModel(_tiny_model(), Vocabulary()), read_manifest(manifest), progress=False)
    reliability("audio that fails to decode during evaluation (loader thread)", "Python API",
                "AudioError in the main process: '.../bad.wav: audio contains NaN or infinite samples'")


@pytest.mark.slow
def test_train_cli_skips_audio_failing_to_decode(tmp_path, reliability):
    train = write_tone_corpus(tmp_path / "c")
    _add_line(train, _nan_wav(tmp_path / "c" / "bad.wav"), "ace", duration=0.41)
    proc = subprocess.run([sys.executable, "-m", "asr.cli", "train", "--train", str(train), "--dev", str(train),
                           "--out", str(tmp_path / "exp"), "--no-progress", *QUICK, "data.num_workers=1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # the dev set is the same: evaluation stops
    assert "bad.wav: audio contains NaN or infinite samples; skipped" in proc.stderr
    assert proc.stderr.strip().endswith("bad.wav: audio contains NaN or infinite samples")
    reliability("audio that fails to decode, in train and dev", "CLI",
                "training skips it with a warning; dev evaluation: exit 2 '.../bad.wav: audio contains NaN ...'")


# ---------------------------------------------------------------- text files that are not UTF-8
@pytest.mark.parametrize("name, header", [("bad.jsonl", ""), ("bad.csv", "audio_filepath,duration,text\n")])
def test_manifest_that_is_not_utf8(tmp_path, capsys, name, header, reliability):
    good = '{"audio_filepath": "a.wav", "duration": 1, "text": "hi"}\n' if not header else "a.wav,1,hi\n"
    bad = good.replace("hi", "caf\xe9").encode("latin-1")
    (tmp_path / name).write_bytes(header.encode() + good.encode() + bad)
    line = 2 + bool(header)
    with pytest.raises(ManifestError, match=rf"{name}:{line}: not UTF-8 text \(byte 0xe9\)"):
        read_manifest(tmp_path / name)
    code, err = _cli(capsys, "train", "--train", str(tmp_path / name), "--dev", str(tmp_path / name),
                     "--out", str(tmp_path / "exp"), *QUICK)
    assert code == 2 and f"{name}:{line}: not UTF-8" in err and "Traceback" not in err
    reliability(f"{Path(name).suffix[1:].upper()} manifest in Latin-1", "CLI",
                f"exit 2: '{name}:{line}: not UTF-8 text (byte 0xe9) ...'")


def test_kaldi_and_librispeech_text_that_is_not_utf8(tmp_path, capsys, reliability):
    kaldi = tmp_path / "kaldi"
    kaldi.mkdir()
    sf.write(kaldi / "a.wav", tone_speech("ace"), 16_000)
    (kaldi / "wav.scp").write_text("a a.wav\nb a.wav\n")
    (kaldi / "text").write_bytes(b"a ace\nb caf\xe9\n")
    with pytest.raises(CorpusError, match=r"kaldi/text:2: not UTF-8 text \(byte 0xe9\)"):
        prepare_kaldi(kaldi, tmp_path / "k.jsonl")
    code, err = _cli(capsys, "prepare", "kaldi", "--data", str(kaldi), "--out", str(tmp_path / "m"))
    assert code == 2 and "kaldi/text:2: not UTF-8" in err
    chapter = tmp_path / "ls" / "19" / "198"
    chapter.mkdir(parents=True)
    sf.write(chapter / "19-198-0000.flac", tone_speech("ace"), 16_000)
    (chapter / "19-198.trans.txt").write_bytes(b"19-198-0000 CAF\xc9\n")
    with pytest.raises(CorpusError, match=r"19-198\.trans\.txt:1: not UTF-8 text \(byte 0xc9\)"):
        prepare_librispeech(tmp_path / "ls", tmp_path / "ls.jsonl")
    reliability("Kaldi text file in Latin-1", "CLI", "exit 2: '.../text:2: not UTF-8 text (byte 0xe9) ...'")
    reliability("LibriSpeech transcript in Latin-1", "Python API",
                "CorpusError: '.../19-198.trans.txt:1: not UTF-8 text (byte 0xc9) ...'")


def test_manifest_with_a_byte_order_mark_is_read(tmp_path):
    line = '{"audio_filepath": "a.wav", "duration": 1, "text": "hi"}\n'
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode())
    assert read_manifest(tmp_path / "bom.jsonl")[0].text == "hi"


# ---------------------------------------------------------------- errors that were already clean (confirmed)
def test_malformed_json_line_and_missing_audio_exit_2_from_train_and_evaluate(tmp_path, capsys, reliability):
    corpus = write_tone_corpus(tmp_path / "c")
    broken = tmp_path / "c" / "broken.jsonl"
    broken.write_text(corpus.read_text() + '{"audio_filepath": "utt0.wav", "duration": 1\n')
    missing = tmp_path / "c" / "missing.jsonl"
    missing.write_text(corpus.read_text().replace("utt4.wav", "nowhere.wav"))
    model = tmp_path / "model"
    save_model(model, _tiny_model(), Vocabulary())
    for argv, expected in [
        (["train", "--train", str(broken), "--dev", str(corpus)], "broken.jsonl:7: not valid JSON"),
        (["train", "--train", str(missing), "--dev", str(corpus)], "line 5: " + str(tmp_path / "c" / "nowhere.wav")),
        (["evaluate", "--model", str(model), "--manifest", str(broken)], "broken.jsonl:7: not valid JSON"),
        (["evaluate", "--model", str(model), "--manifest", str(missing)], "nowhere.wav: file not found"),
    ]:
        extra = ["--out", str(tmp_path / "exp"), *QUICK] if argv[0] == "train" else []
        code, err = _cli(capsys, *argv, *extra)
        assert code == 2 and expected in err and "Traceback" not in err, (argv, err)
    reliability("manifest line that is not JSON", "CLI", "exit 2: 'broken.jsonl:7: not valid JSON (...)'")
    reliability("manifest naming a missing audio file", "CLI",
                "train: exit 2 'missing.jsonl: 1 of 6 ... line 5: .../nowhere.wav: file not found'; "
                "evaluate: exit 2 '.../nowhere.wav: file not found'")


# ---------------------------------------------------------------- text the model cannot be trained on
def test_characters_outside_the_vocabulary_are_dropped(reliability):
    vocab = Vocabulary()
    assert vocab.decode(vocab.encode("Café ✓ naïve 中文 — OK!")) == "cafe naive ok"
    assert vocab.encode("✓ 中文 — !!!") == []
    reliability("transcript characters outside the vocabulary", "Python API",
                "accents stripped, other characters dropped by the normaliser ('Café ✓ 中文' -> 'cafe')")


def test_untrainable_utterances_are_counted_and_skipped_before_training(tmp_path, caplog, reliability):
    dev = write_tone_corpus(tmp_path / "c")
    train = _copy(dev, "train.jsonl")
    _add_line(train, tmp_path / "c" / "utt0.wav", "✓ 中文 !!!", duration=0.74)  # normalises to nothing
    sf.write(tmp_path / "c" / "short.wav", tone_speech("ab"), 16_000)  # 0.34 s for 26 letters
    _add_line(train, tmp_path / "c" / "short.wav", "abcdefghijklmnopqrstuvwxyz", duration=0.34)
    config = load_config(None, QUICK + ["train.log_every_steps=1"])
    with caplog.at_level(logging.WARNING, logger="asr.train.trainer"):
        trainer = Trainer(config, train, dev, tmp_path / "exp", progress=False)
    assert [u.audio_filepath for u in trainer.train_utts] == [str(tmp_path / "c" / f"utt{i}.wav") for i in range(6)]
    message = "\n".join(r.getMessage() for r in caplog.records)
    assert "2 of 8 training utterances skipped" in message
    assert "line 7: text '✓ 中文 !!!' is empty after normalisation" in message
    assert "line 8: 0.34 s gives" in message and "its transcript needs 26" in message
    trainer.fit()
    assert all(math.isfinite(float(row["loss"])) for row in _train_log(tmp_path / "exp"))
    reliability("transcript that normalises to nothing", "Python API",
                "skipped before training, counted in one warning ('line 7: text ... is empty after normalisation')")
    reliability("audio too short for its transcript (CTC infeasible)", "Python API",
                "skipped before training, counted in one warning ('line 8: 0.34 s gives N output frames, "
                "its transcript needs 26')")


def test_a_training_set_with_nothing_trainable_is_a_manifest_error(tmp_path, capsys, reliability):
    train = tmp_path / "train.jsonl"
    sf.write(tmp_path / "a.wav", tone_speech("ab"), 16_000)
    _add_line(train, tmp_path / "a.wav", "!!!", duration=0.34)
    code, err = _cli(capsys, "train", "--train", str(train), "--dev", str(train), "--out", str(tmp_path / "exp"),
                     *QUICK)
    assert code == 2 and "train.jsonl: no utterance can be trained on" in err
    reliability("training manifest with no trainable utterance", "CLI",
                "exit 2: 'train.jsonl: no utterance can be trained on ...'")


@pytest.mark.slow
@pytest.mark.parametrize("consistency", [[], ["train.consistency_weight=0.5"]], ids=["ctc", "cr-ctc"])
def test_a_rank_with_no_readable_utterance_takes_the_same_step_as_one_process(tmp_path, reliability, consistency):
    """Under DDP a rank whose batch failed to load joins the step with zero gradients: two processes log the
    losses and gradient norms of one process accumulating both batches (which skips the empty one), with and
    without CR-CTC's second view (the same as the first here: no augmentation, whose draws differ by process)."""
    train = write_tone_corpus(tmp_path / "c")
    _add_line(train, _nan_wav(tmp_path / "c" / "bad.wav"), "ace", duration=0.41)  # alone in rank 1's 2nd batch
    dev = _copy(train, "dev.jsonl")
    dev.write_text("".join(line for line in dev.read_text().splitlines(True) if "bad.wav" not in line))
    overrides = QUICK + ["data.max_batch_seconds=0.8", "train.log_every_steps=1", "data.num_workers=1", *consistency]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = {}
    for name, launch, extra in [("one", ["-m", "asr.cli"], ["train.grad_accumulation=2"]),
                                ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                         "-m", "asr.cli"], [])]:
        proc = subprocess.run([sys.executable, *launch, "train", "--train", str(train), "--dev", str(dev),
                               "--out", str(tmp_path / name), "--no-progress", *overrides, *extra],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0 and "bad.wav: audio contains NaN" in proc.stderr, proc.stderr[-2000:]
        logs[name] = _train_log(tmp_path / name)
    assert [r["step"] for r in logs["one"]] == [r["step"] for r in logs["two"]] == ["1", "2", "3"]
    for a, b in zip(logs["one"], logs["two"]):
        for key in ("loss", "grad_norm", "consistency")[:3 if consistency else 2]:
            assert abs(float(a[key]) - float(b[key])) <= 1e-3 * float(a[key]) + 1e-4, (key, a, b)
    reliability("audio that fails to decode under DDP (a rank's whole batch)", "CLI (torchrun)",
                "skipped with a warning; that rank joins the step with zero gradients, no hang")


def test_a_training_set_too_small_for_one_step_is_a_clean_error(tmp_path, capsys, reliability):
    corpus = write_tone_corpus(tmp_path / "c")
    code, err = _cli(capsys, "train", "--train", str(corpus), "--dev", str(corpus), "--out", str(tmp_path / "exp"),
                     *QUICK, "data.max_batch_seconds=0.8", "train.grad_accumulation=7")
    assert code == 2 and "6 batches cannot give each of 1 rank(s) 7 batch(es)" in err
    reliability("training set smaller than one step's batches", "CLI",
                "exit 2: '6 batches cannot give each of 1 rank(s) 7 batch(es) (train.grad_accumulation): ...'")
