"""Each recipe end to end on a tiny generated corpus in the real layout, with a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

import asr

from .conftest import (
    TINY_OVERRIDES,
    kaldi_split,
    manifest_text_with_absolute_paths,
    require_system_tools,
    tone_speech,
    write_fake_fsdd,
)

ROOT = Path(__file__).resolve().parents[1]
QUICK = TINY_OVERRIDES + ["train.epochs=2"]


def run_recipe(name: str, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "recipes" / name / "run.py"), "--no-progress", *map(str, args), *QUICK]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def check_outputs(out_dir: Path, sets: list[str]) -> None:
    results = json.loads((out_dir / "results.json").read_text())
    assert sorted(results["results"]) == sorted(sets)
    for r in results["results"].values():
        assert 0 <= r["wer"] and 0 <= r["cer"] and r["utterances"] > 0
    table = (out_dir / "RESULTS.md").read_text()
    assert "run.py" in table  # the command that made it
    for name, r in results["results"].items():  # every set's figures, as results.json has them
        assert name in table and f"{r['wer']:.2%}" in table and f"{r['cer']:.2%}" in table
    model = asr.load_model(out_dir / "best")
    assert isinstance(model.transcribe(tone_speech("one"), sample_rate=16000).text, str)


@pytest.mark.slow
def test_fsdd_recipe(tmp_path):
    write_fake_fsdd(tmp_path / "fsdd", takes=3)
    run_recipe("fsdd", "--data", tmp_path / "fsdd", "--out", tmp_path / "exp", "--tts-voices", 0)
    check_outputs(tmp_path / "exp", ["dev", "test-theo-unseen"])
    kaldi_split(tmp_path / "extra", ["ONE TWO", "A CAB", "SEVEN"])
    out = run_recipe("fsdd", "--data", tmp_path / "fsdd", "--out", tmp_path / "exp2",
                     "--extra-kaldi", tmp_path / "extra",
                     "--tts-voices", 0)
    assert "2 utterances with digit words added" in out.stdout
    assert len((tmp_path / "exp2" / "manifests" / "train_with_extra.jsonl").read_text().splitlines()) == 40 + 2


@pytest.mark.slow
def test_fsdd_recipe_with_synthetic_voices_and_beam_search(tmp_path):
    from asr.lm.kenlm_tools import missing_build_requirements
    from asr.tts.engines import available_voices

    engines = {v.engine for v in available_voices()}
    require_system_tools([e for e in ("espeak-ng", "flite") if e not in engines] + missing_build_requirements())
    write_fake_fsdd(tmp_path / "fsdd", takes=2)
    out = run_recipe("fsdd", "--data", tmp_path / "fsdd", "--out", tmp_path / "exp", "--tts-voices", 2,
                     "--tts-copies", 1, "--beam", "--lm-order", 2)
    assert "60 synthetic utterances from 6 voices added" in out.stdout  # 2 espeak-ng + 4 flite voices
    assert len(list((tmp_path / "exp" / "synthetic").glob("*.flac"))) == 60
    check_outputs(tmp_path / "exp", ["dev", "test-theo-unseen", "dev (beam + LM)", "test-theo-unseen (beam + LM)"])
    tuned = json.loads((tmp_path / "exp" / "best" / "decoder.json").read_text())
    assert tuned["utterances"] == 20 and len(tuned["grid"]) > 1
    assert (tmp_path / "exp" / "best" / "lm" / "lm.bin").exists()


@pytest.mark.slow
def test_speechocean762_recipe(tmp_path):
    kaldi_split(tmp_path / "so" / "train", ["WE CALL IT BEAR", "ONE TWO", "A CAB"] * 3)
    kaldi_split(tmp_path / "so" / "dev", ["ONE TWO", "BEAR"])
    run_recipe("speechocean762", "--data", tmp_path / "so", "--out", tmp_path / "exp")
    check_outputs(tmp_path / "exp", ["dev"])


@pytest.mark.slow
def test_librispeech_recipe(tmp_path):
    root = tmp_path / "LibriSpeech"
    for split, n in (("train-clean-100", 6), ("dev-clean", 2), ("test-clean", 2)):
        chapter = root / split / "103" / "1240"
        chapter.mkdir(parents=True)
        lines = []
        for i in range(n):
            utt = f"103-1240-{i:04d}"
            text = ["CHAPTER ONE", "A BAD EGG", "FACE"][i % 3]
            sf.write(chapter / f"{utt}.flac", tone_speech(text.lower(), seed=i), 16000)
            lines.append(f"{utt} {text}")
        (chapter / "103-1240.trans.txt").write_text("\n".join(lines) + "\n")
    run_recipe("librispeech", "--data", root, "--out", tmp_path / "exp", "--train-sets", "train-clean-100",
               "--test-sets", "test-clean")
    check_outputs(tmp_path / "exp", ["dev", "test-clean"])
    assert len((tmp_path / "exp" / "manifests" / "train.jsonl").read_text().splitlines()) == 6


def test_librispeech_recipe_without_data_says_where_to_get_it(tmp_path):
    cmd = [sys.executable, str(ROOT / "recipes/librispeech/run.py"), "--data", str(tmp_path / "none"),
           "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode != 0 and "LibriSpeech folder not found" in out.stderr and "OpenSLR" in out.stderr


@pytest.mark.slow
def test_manifest_recipe(tmp_path, tone_corpus):
    data = tmp_path / "corpus"
    data.mkdir()
    lines = manifest_text_with_absolute_paths(tone_corpus)
    (data / "train.jsonl").write_text(lines)
    (data / "dev.jsonl").write_text(lines)
    run_recipe("manifest", "--data", data, "--out", tmp_path / "exp")
    check_outputs(tmp_path / "exp", ["dev"])


@pytest.mark.slow
def test_english_recipe_pretrains_on_synthetic_speech_fine_tunes_and_ships(tmp_path):
    import shutil

    require_system_tools([t for t in ("espeak-ng",) if shutil.which(t) is None])
    kaldi_split(tmp_path / "so" / "train", ["WE CALL IT BEAR", "ONE TWO", "A CAB"] * 2)
    kaldi_split(tmp_path / "so" / "dev", ["ONE TWO", "BEAR"])
    write_fake_fsdd(tmp_path / "fsdd", takes=2)
    text = tmp_path / "sentences.txt"
    text.write_text("The cat sat.\nA dog ran home.\nWe like tea.\nShe is here.\nGo to bed now.\n")
    ship = tmp_path / "shipped"
    out = run_recipe("english", "--data", tmp_path / "so", "--fsdd", tmp_path / "fsdd", "--out", tmp_path / "exp",
                     "--mode", "finetune", "--pretrain-epochs", 1, "--tts-text", text, "--tts-engines", "espeak-ng",
                     "--train-sentences", 3, "--dev-sentences", 1, "--ship", ship)
    assert "initialised from" in out.stdout and str(tmp_path / "exp" / "pretrain" / "best") in out.stdout
    check_outputs(tmp_path / "exp", ["dev", "fsdd-theo-unseen", "synthetic-dev-voices"])
    assert len((tmp_path / "exp" / "manifests" / "train_real.jsonl").read_text().splitlines()) == 6 + 20
    assert (tmp_path / "exp" / "pretrain" / "best" / "model.safetensors").exists()
    assert asr.load_model(ship).transcribe(tone_speech("one"), sample_rate=16000).duration > 0
