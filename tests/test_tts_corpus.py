import gzip
import json
import os
import random
import shutil
from collections import Counter

import pytest
import soundfile as sf

import asr.tts.corpus as tts_corpus
from asr.augment import AugmentOptions
from asr.manifest import read_manifest
from asr.tts.corpus import augment_files, make_tts_corpus, pick_voices, plan_corpus, read_sentences, split_voices
from asr.tts.engines import Voice
from tests.conftest import require_system_tools

VOICES = ([Voice("espeak-ng", f"en-us+m{i}") for i in range(40)] + [Voice("flite", n) for n in ("awb", "slt", "rms")]
          + [Voice("piper", "joe")])


def test_sentences_are_distinct_readable_and_of_the_asked_length(tmp_path):
    text = tmp_path / "s.txt.gz"
    with gzip.open(text, "wt") as f:
        f.write("Go.\nI have 3 cats.\nTom is here!\ntom  IS here\nThe quick brown fox jumps.\n\n"
                + " ".join(["word"] * 30) + "\n")
    assert read_sentences([text], min_words=2, max_words=20) == ["Tom is here!", "The quick brown fox jumps."]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_sentences([tmp_path / "nope.txt"])


def test_dev_voices_are_held_out_per_engine():
    train, dev = split_voices(VOICES, 0.1, seed=0)
    assert not set(train) & set(dev) and set(train) | set(dev) == set(VOICES)
    assert Counter(v.engine for v in dev) == {"espeak-ng": 4, "flite": 1}  # piper's single voice stays in train
    assert split_voices(VOICES, 0.1, seed=0) == (train, dev)


def test_engines_are_balanced_not_drowned_by_espeak():
    rng = random.Random(0)
    counts = Counter(v.engine for _ in range(3000) for v in pick_voices(VOICES, 1, rng))
    assert 0.5 < counts["espeak-ng"] / 3000 < 0.75  # sqrt weighting: 6.3 / (6.3 + 1.7 + 1)
    assert counts["piper"] > 200
    two = pick_voices(VOICES, 2, rng)
    assert len(set(two)) == 2


def test_plan_keeps_sentences_and_voices_apart_and_is_deterministic():
    sentences = [f"sentence number {w}" for w in ("one two three four five six seven eight nine ten".split())]
    plan = plan_corpus(sentences, VOICES, train_sentences=6, dev_sentences=3, voices_per_sentence=2, seed=1)
    assert len(plan.train) == 12 and len(plan.dev) == 6
    assert not {j.text for j in plan.train} & {j.text for j in plan.dev}
    assert {j.voice for j in plan.dev} <= set(plan.dev_voices)
    assert {j.voice for j in plan.train} <= set(plan.train_voices)
    assert len({j.key for j in plan.train + plan.dev}) == 18
    again = plan_corpus(sentences, VOICES, 6, 3, 2, seed=1)
    assert again.train == plan.train and again.dev == plan.dev
    with pytest.raises(ValueError, match="sentences"):
        plan_corpus(sentences, VOICES, 9, 3)


def test_augmented_copies_are_deterministic_and_resumable(tone_corpus, tmp_path):
    utts = read_manifest(tone_corpus)
    opts = AugmentOptions(noise_snr_db=[5, 20], noise_prob=1.0, reverb_prob=0.5, babble_prob=0.5, codec_prob=0.3)
    a = augment_files(utts, tmp_path / "a", opts, seed=3, workers=2)
    b = augment_files(utts, tmp_path / "b", opts, seed=3, workers=1)
    for x, y in zip(a, b):
        assert sf.read(x.audio_filepath)[0].tolist() == sf.read(y.audio_filepath)[0].tolist()
        assert x.text == y.text and x.id == y.id
    first = tmp_path / "a" / f"{utts[0].id}.flac"
    os.utime(first, ns=(1, 1))  # a finished file is never redone
    augment_files(utts, tmp_path / "a", opts, seed=3)
    assert first.stat().st_mtime_ns == 1


def test_a_failed_write_leaves_nothing_and_a_rerun_writes_the_copy(tone_corpus, tmp_path, monkeypatch):
    utts = read_manifest(tone_corpus)[:2]
    opts = AugmentOptions(noise_prob=1.0)
    write = sf.write

    def write_half_then_fail(file, data, *args, **kwargs):
        write(file, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tts_corpus.sf, "write", write_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        augment_files(utts, tmp_path, opts, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither a half file under its name nor a temporary
    monkeypatch.setattr(tts_corpus.sf, "write", write)
    copies = augment_files(utts, tmp_path, opts, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{u.id}.flac" for u in utts)
    assert all(sf.info(c.audio_filepath).duration == pytest.approx(u.duration, abs=0.01) for c, u in zip(copies, utts))


def test_a_small_corpus_end_to_end_with_espeak(tmp_path):
    require_system_tools([t for t in ("espeak-ng",) if shutil.which(t) is None])
    text = tmp_path / "s.txt"
    text.write_text("The cat sat down.\nIt is a fine day.\nWe went home early.\nShe reads a book.\n")
    out = tmp_path / "corpus"
    manifests = make_tts_corpus(out, [text], train_sentences=3, dev_sentences=1, engines=["espeak-ng"], workers=2)
    train, dev = read_manifest(manifests["train"]), read_manifest(manifests["dev"])
    assert len(train) == 3 and len(dev) == 1
    assert all(u.text == u.text.lower() and "." not in u.text for u in train + dev)  # normalised transcripts
    assert all(0.5 < u.duration < 5 and "/audio/" in u.audio_filepath for u in train + dev)
    voices = json.loads((out / "voices.json").read_text())
    assert not set(voices["train"]) & set(voices["dev"])
