"""A second output layer over word pieces beside the characters (train.word_pieces): trained with its own CTC loss,
saved in model.json, read by greedy decoding while beam search reads the characters, in every path (torch, ONNX,
streaming, the demo)."""

import csv
import json

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import asr
from asr.checkpoint import CheckpointError, load_model_files, read_model_json, save_model
from asr.config import ConfigError, load_config
from asr.decoding import GreedyDecoder
from asr.model import DeepSpeech2
from asr.serve import demo
from asr.serve.onnx_export import export_onnx
from asr.serve.streaming import PosteriorStream
from asr.train.checkpoints import average_checkpoints, last_checkpoints
from asr.train.trainer import Trainer, run_vocabulary
from asr.word_pieces import WordPieceVocabulary, build_word_pieces

from .conftest import TEXTS, TINY_OVERRIDES, tone_speech
from .test_streaming import stream_events, streamed

CHARS = len(asr.Vocabulary())


@pytest.fixture(scope="module")
def pieces_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pieces") / "tones.model"
    build_word_pieces(TEXTS * 20, 18, path)
    return path


@pytest.fixture(scope="module")
def two_layer_run(trained_tiny_model, tone_corpus, pieces_file, tmp_path_factory):
    """The tone model fine-tuned with a new word-piece layer: (run folder, its trainer)."""
    out = tmp_path_factory.mktemp("two_layers")
    overrides = TINY_OVERRIDES + ["train.epochs=60", "train.log_every_steps=10", "train.warmup_steps=1",
                                  "train.eval_every_steps=20", f"train.init_from={trained_tiny_model}",
                                  f"train.word_pieces={pieces_file}"]
    trainer = Trainer(load_config(None, overrides), tone_corpus, tone_corpus, out, progress=False)
    trainer.fit()
    return out, trainer


def with_random_piece_layer(folder, pieces_file, out):
    """The model in `folder` with a new, random (sharpened) word-piece output layer, saved to `out`."""
    model, vocab, _ = load_model_files(folder)
    pieces = WordPieceVocabulary.from_file(pieces_file)
    torch.manual_seed(0)
    two = DeepSpeech2(model.config.__class__(**{**model.config.__dict__, "word_piece_vocab_size": len(pieces)}))
    missing, _ = two.load_state_dict(model.state_dict(), strict=False)
    assert all(k.startswith("piece_head.") for k in missing)
    with torch.no_grad():
        two.piece_head[1].weight.mul_(20)
    save_model(out, two, vocab, word_pieces=pieces)
    return out


def greedy_alone(vocab, emissions: torch.Tensor, frame_seconds: float):
    """Greedy decoding of one output layer's log-probabilities (frames, its vocabulary)."""
    return GreedyDecoder(vocab).decode(emissions[None], torch.tensor([len(emissions)]), frame_seconds)[0]


def test_both_layers_train_and_each_decoder_reads_its_own(two_layer_run, trained_tiny_model, tone_corpus):
    out, trainer = two_layer_run
    assert trainer.model.config.word_piece_vocab_size == 18
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert float(rows[-1]["word_pieces"]) < float(rows[0]["word_pieces"]) / 5  # the pieces' CTC loss, learnt
    weights = load_file(out / "best" / "model.safetensors")
    assert weights["piece_head.1.weight"].shape == (18, 96) and weights["head.1.weight"].shape == (CHARS, 96)
    config, vocab, meta = read_model_json(out / "best")
    assert meta["word_pieces"]["vocabulary"] == trainer.word_pieces.tokens and len(vocab) == CHARS

    model = asr.load_model(out / "best", backend="torch", precision="fp32")
    assert model.word_pieces.tokens == trainer.word_pieces.tokens
    for i, text in enumerate(TEXTS):
        wave = torch.from_numpy(tone_speech(text, seed=i))
        log_probs = model.posteriors([wave])[0]
        assert log_probs.shape[1] == CHARS + 18
        for part in (log_probs[:, :CHARS], log_probs[:, CHARS:]):  # each layer a distribution of its own
            assert torch.allclose(part.exp().sum(-1), torch.ones(len(part)), atol=1e-4)
        greedy = model.decode(log_probs, 1.0, decoder="greedy")
        pieces_alone = greedy_alone(model.word_pieces, log_probs[:, CHARS:], model.frame_seconds)
        chars_alone = greedy_alone(vocab, log_probs[:, :CHARS], model.frame_seconds)
        assert greedy.text == pieces_alone.text == text  # the word pieces, learnt
        assert [w.start for w in greedy.words] == [w.start for w in pieces_alone.words]
        assert chars_alone.text == text  # the characters, kept
        assert model.decode(log_probs, 1.0, decoder="beam", lexicon=False).text == text
    # its own CTC loss and WER through the evaluation that training runs
    assert trainer.evaluate()["dev_wer"] == 0.0


def test_greedy_reads_the_pieces_and_beam_the_characters(trained_tiny_model, pieces_file, tmp_path):
    """With a random piece layer, greedy text is the pieces' (garbage) while the beam search still spells the
    characters the model learnt."""
    model = asr.load_model(with_random_piece_layer(trained_tiny_model, pieces_file, tmp_path / "m"),
                           backend="torch", precision="fp32")
    wave = torch.from_numpy(tone_speech(TEXTS[2], seed=2))
    log_probs = model.posteriors([wave])[0]
    expected = greedy_alone(model.word_pieces, log_probs[:, CHARS:], model.frame_seconds).text
    assert model.transcribe(wave, sample_rate=16_000, decoder="greedy", speech_check=False).text == expected
    assert model.transcribe(wave, sample_rate=16_000, decoder="beam", lexicon=False).text == TEXTS[2] != expected
    # the demo draws the layer its decoder read
    path = tmp_path / "a.wav"
    sf.write(path, wave.numpy(), 16_000)
    for decoder, rows, tokens in (("greedy", 18, model.word_pieces.tokens), ("beam", CHARS, model.vocab.tokens)):
        analysis = demo.analyze(model, str(path), decoder, demo.DemoLimits())
        assert analysis.posteriors.shape[0] == rows and analysis.tokens == list(tokens)


def test_onnx_gives_both_layers(trained_tiny_model, pieces_file, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'asr[onnx]')")
    folder = with_random_piece_layer(trained_tiny_model, pieces_file, tmp_path / "m")
    export_onnx(folder)
    torch_model = asr.load_model(folder, backend="torch", precision="fp32")
    onnx_model = asr.load_model(folder, backend="onnx")
    assert onnx_model.backend == "onnx"
    waves = [torch.from_numpy(tone_speech(t, seed=i)) for i, t in enumerate(TEXTS[:3])]
    for a, b in zip(torch_model.posteriors(waves), onnx_model.posteriors(waves)):
        assert a.shape == b.shape == (len(a), CHARS + 18) and torch.allclose(a, b, atol=1e-3)
    assert [r.text for r in onnx_model.transcribe(waves, sample_rate=16_000)] == [
        r.text for r in torch_model.transcribe(waves, sample_rate=16_000)]


def test_streaming_gives_both_layers_and_decodes_as_offline(streaming_model, pieces_file, tmp_path):
    model = asr.load_model(with_random_piece_layer(streaming_model, pieces_file, tmp_path / "m"), device="cpu",
                           backend="torch", precision="fp32")
    wave = torch.from_numpy(tone_speech(TEXTS[1], seed=1))
    expected = model.posteriors([wave])[0]
    got = streamed(PosteriorStream(model.model), wave, [16 * 160])
    assert got.shape == expected.shape == (len(expected), CHARS + 18) and torch.allclose(got, expected, atol=1e-4)
    for decoder, options in (("greedy", {}), ("beam", {"lexicon": False})):
        offline = model.transcribe(wave, sample_rate=16_000, decoder=decoder, **options)
        finals = [e.text for e in stream_events(model, wave, 160 * 16, decoder=decoder, **options) if e.kind == "final"]
        assert " ".join(finals) == offline.text
    assert model.transcribe(wave, sample_rate=16_000, decoder="beam", lexicon=False).text == TEXTS[1]


def test_damaged_word_pieces_in_model_json_are_clear_errors(trained_tiny_model, pieces_file, tmp_path):
    folder = with_random_piece_layer(trained_tiny_model, pieces_file, tmp_path / "m")
    meta = json.loads((folder / "model.json").read_text())
    cases = [
        ({**meta, "word_pieces": {"vocabulary": "abc", "tokenizer": meta["word_pieces"]["tokenizer"]}},
         "word_pieces must be"),
        ({**meta, "word_pieces": {**meta["word_pieces"], "tokenizer": {"type": "sentencepiece", "model": "#"}}},
         "invalid word_pieces: tokenizer.model is not base64"),
        ({**meta, "config": {**meta["config"], "word_piece_vocab_size": 0}},
         "config.word_piece_vocab_size is 0 but word_pieces has 18 tokens"),
        ({k: v for k, v in meta.items() if k != "word_pieces"},
         "config.word_piece_vocab_size is 18 but word_pieces has 0"),
    ]
    for damaged, message in cases:
        (folder / "model.json").write_text(json.dumps(damaged))
        with pytest.raises(CheckpointError, match=message):
            asr.load_model(folder)


def test_a_run_refuses_other_pieces_to_resume_and_both_kinds_of_pieces(two_layer_run, trained_tiny_model,
                                                                        tone_corpus, tmp_path):
    out, _ = two_layer_run
    other = tmp_path / "other.model"
    build_word_pieces(TEXTS * 20, 16, other)
    with pytest.raises(CheckpointError, match="the word pieces"):
        Trainer(load_config(None, TINY_OVERRIDES + [f"train.word_pieces={other}"]), tone_corpus, tone_corpus, out,
                progress=False).fit()
    with pytest.raises(ConfigError, match="word_pieces: a second output layer beside characters"):
        load_config(None, [f"train.word_pieces={other}", f"train.tokenizer={other}"])
    with pytest.raises(ConfigError, match="train.word_pieces: .* is a model without word pieces"):
        Trainer(load_config(None, TINY_OVERRIDES + [f"train.word_pieces={trained_tiny_model}"]), tone_corpus,
                tone_corpus, tmp_path / "x", progress=False)
    # the pieces may come from a model folder that has them
    pieces = Trainer(load_config(None, TINY_OVERRIDES + [f"train.word_pieces={out / 'best'}"]), tone_corpus,
                     tone_corpus, tmp_path / "y", progress=False).word_pieces
    assert pieces.tokens == read_model_json(out / "best")[2]["word_pieces"]["vocabulary"]
    # and a run that emits word pieces alone may take them from it too (not its characters)
    assert run_vocabulary(str(out / "best")).tokens == pieces.tokens


def test_averaged_checkpoints_keep_their_word_pieces(two_layer_run, tmp_path):
    out, trainer = two_layer_run
    folders = last_checkpoints(out, 2)
    assert len(folders) == 2
    model, _, meta = load_model_files(average_checkpoints(folders, tmp_path / "avg"))
    assert model.config.word_piece_vocab_size == 18 and meta["word_pieces"]["vocabulary"] == trainer.word_pieces.tokens


def test_fine_tuning_a_model_with_both_layers_keeps_both(two_layer_run, tone_corpus, tmp_path):
    out, trainer = two_layer_run
    overrides = TINY_OVERRIDES + ["train.epochs=1", "train.max_steps=1", "train.lr=1e-9", "train.warmup_steps=1",
                                  f"train.init_from={out / 'best'}"]
    tuned = Trainer(load_config(None, overrides), tone_corpus, tone_corpus, tmp_path / "run", progress=False)
    assert tuned.word_pieces.tokens == trainer.word_pieces.tokens
    tuned.fit()
    before = load_file(out / "best" / "model.safetensors")
    after = load_file(tmp_path / "run" / "best" / "model.safetensors")
    assert torch.allclose(before["piece_head.1.weight"], after["piece_head.1.weight"], atol=1e-4)
