"""Reliability of language models and beam search: bad LM text, damaged LM files, hot-word strings, long audio."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import asr
from asr.decoding import DecodingOptions
from asr.errors import ASRError, OptionsError
from asr.lm.beam_search import BeamSearchDecoder
from asr.lm.kenlm_tools import LMError, kenlm_tools, missing_build_requirements
from asr.lm.language_model import LanguageModel, build_lm, normalized_sentences
from asr.metrics import error_rates
from asr.text import Vocabulary

from .conftest import SHARED_DATA, require_system_tools
from .test_lm import _posteriors

VOCAB = Vocabulary()
SHIPPED_LM = Path(asr.__file__).parent / "default_model" / "lm"
SENTENCES = ["a bad egg", "dig a hole", "the bad one", "one two"]
GARBAGE_AFTER_MAGIC = b"mmap lm http://kheafield.com/code format version 5\n\0" + bytes(range(256)) * 40


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr.cli", *args], capture_output=True, text=True)


def _outcome(message: str, path: Path, name: str = "<file>") -> str:
    """A message for the reliability table: the path as `name`, up to its first semicolon."""
    return message.strip().splitlines()[-1].split("error: ", 1)[-1].replace(str(path), name).split(";")[0]


@pytest.fixture(scope="module")
def tools():
    require_system_tools(missing_build_requirements())
    return kenlm_tools()  # built once into ~/.cache/asr


@pytest.fixture(scope="module")
def small_lm(tools, tmp_path_factory) -> Path:
    text = tmp_path_factory.mktemp("lmtext") / "text.txt"
    text.write_text("\n".join(SENTENCES * 10) + "\n")
    out = tmp_path_factory.mktemp("lm") / "small"
    build_lm([text], out, order=3, prune=[0, 0, 0])
    return out


# ---------------------------------------------------------------- 1. LM text that is gzip or binary

def test_gzip_text_named_txt_is_read_as_gzip(tools, tmp_path, reliability):
    text = tmp_path / "corpus.txt"  # gzipped, whatever its name says
    text.write_bytes(gzip.compress(("\n".join(SENTENCES) + "\n").encode()))
    assert list(normalized_sentences([text], VOCAB)) == SENTENCES
    info = build_lm([text], tmp_path / "lm", order=2, prune=[0])
    assert sorted(LanguageModel.load(tmp_path / "lm").words) == sorted({w for s in SENTENCES for w in s.split()})
    assert info.sentences == len(SENTENCES)
    reliability("LM text: gzip file named .txt", "Python", "read as gzip; LM of its words")


@pytest.mark.parametrize("kind, content, via_cli", [
    ("binary file (NUL bytes)", bytes(range(256)) * 64, True),
    ("binary file (no NUL, not UTF-8)", bytes(range(128, 256)) * 64 + b"\nthe bad one\n", False),
    ("gzip of a binary file", gzip.compress(bytes(range(256)) * 64), False),
])
def test_binary_lm_text_is_refused_before_lmplz(tools, tmp_path, kind, content, via_cli, reliability):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(LMError, match="not a text file") as error:
        build_lm([path], tmp_path / "lm")
    assert str(path) in str(error.value) and not (tmp_path / "lm").exists()
    if not via_cli:
        return reliability(f"LM text: {kind}", "Python", f"LMError: '{_outcome(str(error.value), path)}'")
    proc = _cli("lm", "build", "--text", str(path), "--out", str(tmp_path / "lm"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(path) in proc.stderr, proc.stderr
    assert not (tmp_path / "lm").exists()
    reliability(f"LM text: {kind}", "CLI", f"exit 2: '{_outcome(proc.stderr, path)}'")


def test_truncated_gzip_and_bad_manifest_line_name_the_file(tmp_path, reliability):
    truncated = tmp_path / "text.txt.gz"
    data = gzip.compress(("\n".join(SENTENCES * 2000) + "\n").encode())
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(LMError, match="damaged gzip") as error:
        list(normalized_sentences([truncated], VOCAB))
    assert str(truncated) in str(error.value)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"text": "a bad egg"}) + "\n{not json\n")
    with pytest.raises(LMError, match=f"{manifest}:2: ") as error:
        list(normalized_sentences([manifest], VOCAB))
    reliability("LM text: truncated gzip", "Python", "LMError: '<file>: damaged gzip file ...'")
    reliability("LM text: manifest line not JSON", "Python", "LMError: '<file>:2: not JSON ...'")


# ---------------------------------------------------------------- 2. damaged LM files

def _copy_lm(dest: Path, binary: bytes | None = None) -> Path:
    """A copy of the shipped LM, with `binary` as its lm.bin if given (the shipped folder is never touched)."""
    dest.mkdir()
    for name in ("words.txt", "lexicon.txt", "lm.json", *(["lm.bin"] if binary is None else [])):
        shutil.copy2(SHIPPED_LM / name, dest / name)
    if binary is not None:
        (dest / "lm.bin").write_bytes(binary)
    return dest


@pytest.mark.parametrize("case", ["truncated", "garbage after the magic"])
def test_damaged_lm_binary_is_a_clear_error(case, tmp_path, reliability):
    with open(SHIPPED_LM / "lm.bin", "rb") as f:
        binary = f.read(1_000_000) if case == "truncated" else GARBAGE_AFTER_MAGIC
    folder = _copy_lm(tmp_path / "lm", binary)
    with pytest.raises(LMError, match="damaged KenLM binary") as error:
        LanguageModel.load(folder)
    assert str(folder / "lm.bin") in str(error.value)
    with pytest.raises(ASRError):
        asr.load_model(lm=folder)
    if case != "truncated":
        return reliability(f"LM: lm.bin {case}", "Python", "LMError: '<lm.bin>: damaged KenLM binary ...'")
    text = tmp_path / "text.txt"
    text.write_text("a bad egg\n")
    proc = _cli("lm", "perplexity", "--lm", str(folder), "--text", str(text))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "lm.bin" in proc.stderr, proc.stderr
    reliability(f"LM: lm.bin {case}", "CLI", f"exit 2: '{_outcome(proc.stderr, folder / 'lm.bin', '<lm.bin>')}'")


def test_lm_damaged_after_loading_fails_when_the_decoder_is_built(small_lm, tmp_path, reliability):
    folder = tmp_path / "lm"
    shutil.copytree(small_lm, folder)
    lm = LanguageModel.load(folder)
    (folder / "lm.bin").write_bytes(GARBAGE_AFTER_MAGIC)
    for hotwords in ([], ["bed"]):
        with pytest.raises(LMError, match="damaged KenLM binary") as error:
            BeamSearchDecoder(VOCAB, lm, DecodingOptions(decoder="beam", hotwords=hotwords))
        assert str(folder / "lm.bin") in str(error.value)
    reliability("LM: lm.bin damaged after loading", "Python", "LMError when the beam decoder is built")


def test_lm_binary_damaged_where_kenlm_cannot_see_fails_its_checksum(small_lm, tmp_path, reliability):
    folder = tmp_path / "lm"
    shutil.copytree(small_lm, folder)
    binary = bytearray((folder / "lm.bin").read_bytes())
    middle = slice(len(binary) // 2, len(binary) // 2 + 64)
    binary[middle] = bytes(b ^ 0xFF for b in binary[middle])
    (folder / "lm.bin").write_bytes(binary)
    LanguageModel(folder, folder / "lm.bin", folder / "lexicon.txt", []).check_binary()  # KenLM sees nothing
    with pytest.raises(LMError, match="checksum") as error:
        LanguageModel.load(folder)
    assert str(folder / "lm.bin") in str(error.value)
    reliability("LM: lm.bin bytes flipped (same size)", "Python",
                "LMError: '<lm.bin>: damaged KenLM binary (checksum)'")


def test_lm_text_files_that_are_not_text(tmp_path, reliability):
    folder = _copy_lm(tmp_path / "lm")
    (folder / "lexicon.txt").write_bytes(bytes(range(128, 256)) * 10)
    with pytest.raises(LMError, match="lexicon.txt") as error:
        LanguageModel.load(folder)
    assert str(folder) in str(error.value)
    reliability("LM: lexicon.txt not text", "Python", "LMError: '<file>: not UTF-8 text ...'")


# ---------------------------------------------------------------- 3. hot words given as one string

# "b", then a vowel heard as "a" a little more than "e", then "d": acoustically "bad", nearly "bed"
BAD_OR_BED = [{"_": 0.9}, {"b": 0.95}, {"_": 0.9}, {"a": 0.52, "e": 0.46}, {"_": 0.9}, {"d": 0.95}, {"_": 0.9}]


def test_hotwords_string_is_one_phrase(small_lm, reliability):
    assert DecodingOptions(decoder="beam", hotwords="bed").hotwords == ["bed"]
    assert DecodingOptions(decoder="beam", hotwords=("bad egg", "bed")).hotwords == ["bad egg", "bed"]
    lp = _posteriors(BAD_OR_BED)[None]
    decoder = BeamSearchDecoder(VOCAB, LanguageModel.load(small_lm),
                                DecodingOptions(decoder="beam", lm_weight=1.0, hotwords="bed"))
    assert decoder.decode(lp, torch.tensor([lp.shape[1]]), 0.04)[0].text == "bed"
    for bad in (5, ["bed", 3], [None]):
        with pytest.raises(OptionsError, match="hotwords"):
            DecodingOptions(decoder="beam", hotwords=bad)
    reliability("hotwords=\"bed\" (a string)", "Python", "one phrase, as [\"bed\"]")


# ---------------------------------------------------------------- 4. beam search on long audio

SPEECH = [{"c": 0.9}, {"_": 0.9}, {"a": 0.9}, {"_": 0.9}, {"b": 0.9}] * 4  # 20 frames, no long blank run
PAUSE = {"_": 0.99}


def test_long_emissions_are_cut_at_pauses_into_short_pieces():
    from asr.lm.beam_search import speech_pieces

    # a pause of a second or more inside the speech is a cut; silence at either end is not
    lp = _posteriors([PAUSE] * 70 + SPEECH + [PAUSE] * 60 + SPEECH + [PAUSE] * 70)
    assert speech_pieces(lp, VOCAB.blank, pause_frames=50, max_frames=1000) == [(0, 120), (120, len(lp))]
    assert speech_pieces(lp, VOCAB.blank, pause_frames=61, max_frames=1000) == [(0, len(lp))]
    # without such pauses, pieces longer than max_frames are cut at their longest blank run
    lp = _posteriors(([PAUSE] * 10 + SPEECH + [PAUSE] * 3) * 40 + SPEECH * 30)
    pieces = speech_pieces(lp, VOCAB.blank, pause_frames=50, max_frames=100)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(lp) and len(pieces) > len(lp) // 100
    assert all(a < b == c for (a, b), (c, _) in zip(pieces, pieces[1:]))
    assert all(b - a <= 100 for a, b in pieces)
    assert all(lp[b, VOCAB.blank].exp() > 0.99 for _, b in pieces[:-1])  # cuts fall on sure blanks


def _speechocean_minutes(minutes: float) -> tuple[torch.Tensor, str]:
    """Real speech: speechocean762 dev utterances one after another, and their transcript."""
    from asr.audio import load_audio

    folder = SHARED_DATA / "speechocean762" / "dev"
    if not (folder / "text").is_file():
        pytest.skip(f"needs speechocean762 dev recordings in {folder} (../shared/data is absent)")
    texts = dict(line.strip().split(" ", 1) for line in (folder / "text").read_text().splitlines() if " " in line)
    waves, refs = [], []
    for path in sorted((folder / "audio").glob("*.opus")):
        waves.append(load_audio(path))
        refs.append(texts[path.stem].lower())
        if sum(len(w) for w in waves) >= minutes * 60 * 16_000:
            break
    return torch.cat(waves), " ".join(refs)


@pytest.mark.slow
def test_beam_search_on_five_minutes_of_speech_spells_lm_words(reliability):
    wave, reference = _speechocean_minutes(5)
    model = asr.load_model(device="cpu")
    assert model.lm is not None
    log_probs = model.posteriors([wave])[0]  # once for both decoders
    beam, greedy = (model.decode(log_probs, len(wave) / 16_000, wave, decoder=d)
                    for d in ("beam", "greedy"))
    vocabulary = set(model.lm.words)
    glued = [w for w in beam.text.split() if w not in vocabulary]
    assert not glued, f"{len(glued)} of {len(beam.text.split())} beam words are not LM words: {glued[:10]}"
    beam_wer, greedy_wer = (error_rates([reference], [r.text]).wer for r in (beam, greedy))
    assert beam_wer <= greedy_wer, (beam_wer, greedy_wer)
    times = [t for w in beam.words for t in (w.start, w.end)]
    assert times == sorted(times) and times[-1] <= beam.duration and len(beam.words) > 100
    reliability("beam search on 5 min of speech", "Python",
                f"all words from the LM; WER {beam_wer:.0%} (greedy {greedy_wer:.0%})")
