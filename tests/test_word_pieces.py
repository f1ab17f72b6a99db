"""Word-piece vocabularies: learning them, model folders that carry them, decoding and training with them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import asr
from asr.checkpoint import CheckpointError, load_model_files, read_model_json, save_model
from asr.config import ConfigError, load_config
from asr.decoding import GreedyDecoder, words_from_emissions
from asr.model import DeepSpeech2, ModelConfig
from asr.text import BLANK, WORD_START, Vocabulary
from asr.train.trainer import Trainer
from asr.word_pieces import WordPieceError, WordPieceVocabulary, build_word_pieces

from .conftest import TEXTS, TINY_OVERRIDES

SENTENCES = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "one two three"] * 30


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    out = tmp_path_factory.mktemp("pieces") / "pieces.model"
    return build_word_pieces(SENTENCES, 24, out), out


def test_learned_pieces_spell_frequent_words_whole_and_round_trip(pieces):
    vocab, path = pieces
    assert vocab.tokens[0] == BLANK and len(vocab) == 24 and path.stat().st_size < 10_000
    assert vocab.spell_word("dog") == [WORD_START + "dog"]  # frequent: one piece
    assert "".join(vocab.spell_word("cot")).replace(WORD_START, "") == "cot"  # new: spelled in smaller pieces
    assert vocab.spell_word("zebra") is None  # no piece has a "z"
    ids = vocab.encode("The CAT sat, on 2 mats!")
    assert 0 not in ids and vocab.decode(ids) == "the cat sat on two mats"
    assert WordPieceVocabulary.from_file(path).tokens == vocab.tokens


def test_too_many_pieces_or_no_text_is_a_clear_error(tmp_path):
    with pytest.raises(WordPieceError, match="cannot learn 500 word pieces from 120 lines: this text gives at most"):
        build_word_pieces(SENTENCES, 500, tmp_path / "p.model")
    with pytest.raises(WordPieceError, match="no text"):
        build_word_pieces(["", "!!"], 24, tmp_path / "p.model")
    assert not (tmp_path / "p.model").exists()
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(WordPieceError, match="junk.model: not a sentencepiece model"):
        WordPieceVocabulary.from_file(tmp_path / "junk.model")


def test_words_timings_and_confidences_from_emitted_pieces():
    tokens = [WORD_START + "the", WORD_START + "c", "at", WORD_START, "sat"]
    result = words_from_emissions(tokens, [3, 10, 12, 20, 21], [0.9, 0.8, 0.6, 0.5, 0.7], 0.04)
    assert result.text == "the cat sat"
    assert [(w.word, w.start, w.end) for w in result.words] == [("the", 0.12, 0.16), ("cat", 0.4, 0.52),
                                                               ("sat", 0.84, 0.88)]
    assert result.words[1].confidence == pytest.approx(0.7)
    # characters, as before: a space ends a word
    chars = words_from_emissions(list("ab cd"), [1, 2, 3, 4, 5], [1.0] * 5, 0.04)
    assert chars.text == "ab cd" and chars.words[1].start == pytest.approx(0.16)


def test_greedy_decoding_joins_pieces_into_words(pieces):
    vocab = pieces[0]
    ids = vocab.encode("the dog sat")
    frames = [i for t in ids for i in (t, 0)]  # each piece, then a blank
    log_probs = torch.full((1, len(frames), len(vocab)), -20.0)
    log_probs[0, torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    result = GreedyDecoder(vocab).decode(log_probs, torch.tensor([len(frames)]), 0.04)[0]
    assert result.text == "the dog sat" and len(result.words) == 3


def test_model_folder_carries_its_pieces_and_rejects_damaged_ones(pieces, tmp_path):
    vocab = pieces[0]
    model = DeepSpeech2(ModelConfig(gru_layers=1, gru_hidden=32, conv_channels=[4], conv_kernels=[[5, 5]],
                                    conv_strides=[[2, 2]], vocab_size=len(vocab)))
    save_model(tmp_path / "m", model, vocab)
    _, loaded, _ = load_model_files(tmp_path / "m")
    assert isinstance(loaded, WordPieceVocabulary) and loaded.encode("the cat") == vocab.encode("the cat")
    meta_file = tmp_path / "m" / "model.json"
    meta = json.loads(meta_file.read_text())
    for damage, message in [({"model": "@@not base64@@"}, "not base64"), ({"type": "bpe"}, "tokenizer must be"),
                            ({"model": meta["tokenizer"]["model"][:200]}, "not a sentencepiece model")]:
        meta_file.write_text(json.dumps({**meta, "tokenizer": {**meta["tokenizer"], **damage}}))
        with pytest.raises(CheckpointError, match=f"model.json: invalid vocabulary: .*{message}"):
            read_model_json(tmp_path / "m")
    meta_file.write_text(json.dumps({**meta, "vocabulary": [BLANK] + list(reversed(meta["vocabulary"][1:]))}))
    with pytest.raises(CheckpointError, match="not its sentencepiece model's pieces"):
        read_model_json(tmp_path / "m")


def test_fine_tuning_a_character_model_into_pieces_keeps_all_but_the_output_layer(
        trained_tiny_model, tone_corpus, pieces, tmp_path):
    path = tmp_path / "tones.model"
    build_word_pieces(TEXTS * 20, 18, path)
    overrides = TINY_OVERRIDES + ["train.epochs=1", "train.max_steps=1", "train.lr=1e-9", "train.warmup_steps=1",
                                  f"train.init_from={trained_tiny_model}"]
    trainer = Trainer(load_config(None, overrides + [f"train.tokenizer={path}"]), tone_corpus, tone_corpus,
                      tmp_path / "run", progress=False)
    assert isinstance(trainer.vocab, WordPieceVocabulary) and len(trainer.vocab) == 18
    trainer.fit()
    source, tuned = load_file(trained_tiny_model / "model.safetensors"), load_file(
        tmp_path / "run" / "best" / "model.safetensors")
    assert tuned["head.1.weight"].shape == (18, 96) and source["head.1.weight"].shape == (29, 96)
    # every weight but the output layer's as it was (a learning rate of 1e-9 for the one step; batch-norm
    # statistics move with any step)
    same = [k for k in source if k in tuned and "running_" not in k and "num_batches" not in k]
    assert set(source) - set(same) - {"head.1.weight", "head.1.bias"} <= {k for k in source if "norm." in k}
    for k in set(same) - {"head.1.weight", "head.1.bias"}:
        assert torch.allclose(source[k].float(), tuned[k].float(), atol=1e-4), k
    _, vocab, _ = load_model_files(tmp_path / "run" / "best")
    assert vocab.tokens == trainer.vocab.tokens
    result = asr.load_model(tmp_path / "run" / "best", backend="torch").transcribe(tone_corpus.parent / "utt0.wav")
    assert result.text == " ".join(w.word for w in result.words)  # whatever one step taught it
    # from the piece model to characters, no tokenizer asked: refused, as any other vocabulary change
    with pytest.raises(CheckpointError, match="its vocabulary differs"):
        Trainer(load_config(None, TINY_OVERRIDES + [f"train.init_from={tmp_path / 'run' / 'best'}"]), tone_corpus,
                tone_corpus, tmp_path / "chars", progress=False).fit()
    # a run's pieces may also come from a model folder that has them
    assert Trainer(load_config(None, TINY_OVERRIDES + [f"train.tokenizer={tmp_path / 'run' / 'best'}"]),
                   tone_corpus, tone_corpus, tmp_path / "again", progress=False).vocab.tokens == vocab.tokens
    with pytest.raises(ConfigError, match="train.tokenizer: .*missing.model: cannot read"):
        Trainer(load_config(None, TINY_OVERRIDES + [f"train.tokenizer={tmp_path / 'missing.model'}"]), tone_corpus,
                tone_corpus, tmp_path / "bad", progress=False)


def test_cli_learns_pieces_from_a_manifest(tone_corpus, tmp_path):
    out = tmp_path / "p.model"
    run = subprocess.run([sys.executable, "-m", "asr.cli", "word-pieces", "--text", str(tone_corpus),
                          "--vocab-size", "16", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "16 tokens" in run.stdout and WordPieceVocabulary.from_file(out).tokens[0] == BLANK
    run = subprocess.run([sys.executable, "-m", "asr.cli", "word-pieces", "--text", str(tmp_path / "none.txt"),
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 2 and "none.txt: text file not found" in run.stderr
    assert Vocabulary().decode([3, 1, 4]) == "a b"
