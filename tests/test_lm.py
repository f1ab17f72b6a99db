"""KenLM language models and beam search: build, decode with and without LM, tune, hot words, bad LM folders."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import asr
from asr.decoding import DecodingOptions
from asr.lm import beam_search
from asr.lm.beam_search import SKIP_BLANK, BeamSearchDecoder, searched_frames
from asr.lm.kenlm_tools import LMError, kenlm_tools, missing_build_requirements
from asr.lm.language_model import LanguageModel, build_lm, perplexity
from asr.lm.tune import store_decoder, tune_beam
from asr.text import Vocabulary
from asr.word_pieces import build_word_pieces

from .conftest import TEXTS, require_system_tools

require_system_tools(missing_build_requirements())  # KenLM's build needs them

VOCAB = Vocabulary()


@pytest.fixture(scope="session")
def tools():
    return kenlm_tools()  # built once into ~/.cache/asr (about a minute and a half on 2 cores)


@pytest.fixture(scope="session")
def tone_lm(tools, tmp_path_factory):
    text = tmp_path_factory.mktemp("lmtext") / "text.txt"
    text.write_text("\n".join(TEXTS * 20 + ["a bad egg", "dig a hole", "the bad one"] * 5) + "\n")
    out = tmp_path_factory.mktemp("lm") / "tones"
    info = build_lm([text], out, order=3, prune=[0, 0, 0])
    assert info.vocabulary == len({w for t in TEXTS + ["the"] for w in t.split()})
    return out


def _posteriors(spec: list[dict[str, float]]) -> torch.Tensor:
    """(frames, vocab) log-probabilities: each frame's listed characters get those probabilities, blank the rest."""
    probs = torch.full((len(spec), len(VOCAB)), 1e-4)
    for t, frame in enumerate(spec):
        for ch, p in frame.items():
            probs[t, VOCAB.tokens.index(ch) if ch != "_" else 0] = p
        probs[t, 0] += max(0.0, 1 - probs[t].sum())
    return (probs / probs.sum(1, keepdim=True)).log()


# "b", then a vowel heard as "a" a little more than "e", then "d": acoustically "bad", nearly "bed"
BAD_OR_BED = [{"_": 0.9}, {"b": 0.95}, {"_": 0.9}, {"a": 0.52, "e": 0.46}, {"_": 0.9}, {"d": 0.95}, {"_": 0.9}]


def test_quantized_lm_is_smaller_and_scores_alike(tools, tmp_path):
    import random

    rng = random.Random(0)  # enough n-grams that the quantization tables are small beside them
    words = ["".join(rng.choices("abcdefghij", k=5)) for _ in range(300)]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(rng.choices(words, k=8)) for _ in range(3000)) + "\n")
    full = build_lm([text], tmp_path / "full", order=3, prune=[0, 0, 0])
    small = build_lm([text], tmp_path / "q8", order=3, prune=[0, 0, 0], quantize_bits=8)
    assert full.quantize_bits is None and small.quantize_bits == 8
    assert json.loads((tmp_path / "q8" / "lm.json").read_text())["quantize_bits"] == 8
    assert (tmp_path / "q8" / "lm.bin").stat().st_size < 0.8 * (tmp_path / "full" / "lm.bin").stat().st_size
    # quantized probabilities: nearly the same perplexity
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(" ".join(rng.choices(words, k=8)) for _ in range(50)) + "\n")
    ppl = [perplexity(LanguageModel.load(tmp_path / d), [held_out]).perplexity for d in ("full", "q8")]
    assert ppl[1] == pytest.approx(ppl[0], rel=0.1)
    for bad in (1, 30, 8.5):
        with pytest.raises(LMError, match="quantize_bits"):
            build_lm([text], tmp_path / "bad", order=3, quantize_bits=bad)
    assert not (tmp_path / "bad").exists()


def test_lm_folder_holds_binary_vocabulary_and_lexicon(tone_lm):
    lm = LanguageModel.load(tone_lm)
    assert lm.binary.read_bytes().startswith(b"mmap lm")
    assert set(lm.words) >= {"one", "two", "cab", "bad", "egg"}
    assert "d i g\n" in lm.lexicon.read_text().replace("dig\t", "")
    assert json.loads((tone_lm / "lm.json").read_text())["order"] == 3


def test_hot_word_outside_the_lm_is_recognised_when_boosted(tone_lm):
    lm = LanguageModel.load(tone_lm)
    lp = _posteriors(BAD_OR_BED)[None]
    lengths = torch.tensor([lp.shape[1]])
    plain = BeamSearchDecoder(VOCAB, lm, DecodingOptions(decoder="beam", lm_weight=1.0))
    assert plain.decode(lp, lengths, 0.04)[0].text == "bad"  # "bed" is not even in the LM's vocabulary
    boosted = BeamSearchDecoder(VOCAB, lm, DecodingOptions(decoder="beam", lm_weight=1.0, hotwords=["bed"]))
    assert boosted.decode(lp, lengths, 0.04)[0].text == "bed"
    free = BeamSearchDecoder(VOCAB, None, DecodingOptions(decoder="beam", lexicon=False))
    assert free.decode(lp, lengths, 0.04)[0].text == "bad"


def test_lexicon_search_spells_only_known_words(tone_lm):
    # greedy reads "cxb"; the lexicon knows "cab"
    spec = [{"c": 0.9}, {"_": 0.9}, {"x": 0.5, "a": 0.45}, {"_": 0.9}, {"b": 0.9}]
    lp = _posteriors(spec)[None]
    lengths = torch.tensor([len(spec)])
    assert asr.decoding.greedy_decode(lp, lengths, VOCAB, 0.04)[0].text == "cxb"
    lexicon = BeamSearchDecoder(VOCAB, LanguageModel.load(tone_lm), DecodingOptions(decoder="beam", lm_weight=0.5))
    result = lexicon.decode(lp, lengths, 0.04)[0]
    assert result.text == "cab"
    assert 0 < result.words[0].confidence <= 1


def test_lexicon_search_over_word_pieces(tone_lm, tmp_path):
    pieces = build_word_pieces(TEXTS * 20, 18, tmp_path / "p.model")
    assert pieces.spell_word("cab") == ["\u2581", "c", "a", "b"] and "\u2581a" in pieces.tokens
    # "a", then "c", a vowel heard as "o" a little more than "a", "b": greedy reads "a cob"; the lexicon knows "cab"
    spec = [{"\u2581a": 0.9}, {"_": 0.9}, {"\u2581": 0.9}, {"c": 0.9}, {"o": 0.5, "a": 0.45}, {"b": 0.9}, {"_": 0.9}]
    probs = torch.full((len(spec), len(pieces)), 1e-4)
    for t, frame in enumerate(spec):
        for token, p in frame.items():
            probs[t, pieces.tokens.index(token) if token != "_" else 0] = p
    lp, lengths = (probs / probs.sum(1, keepdim=True)).log()[None], torch.tensor([len(spec)])
    assert asr.decoding.greedy_decode(lp, lengths, pieces, 0.04)[0].text == "a cob"
    free = BeamSearchDecoder(pieces, None, DecodingOptions(decoder="beam", lexicon=False)).decode(lp, lengths, 0.04)
    assert free[0].text == "a cob"
    lexicon = BeamSearchDecoder(pieces, LanguageModel.load(tone_lm), DecodingOptions(decoder="beam", lm_weight=0.5))
    result = lexicon.decode(lp, lengths, 0.04)[0]
    assert result.text == "a cab"
    assert [(w.word, w.start) for w in result.words] == [("a", 0.0), ("cab", 0.12)]  # from its first letter
    assert 0 < result.words[1].confidence <= 1
    with pytest.raises(asr.errors.OptionsError, match="cannot emit: \\['zoo'\\]"):
        BeamSearchDecoder(pieces, LanguageModel.load(tone_lm), DecodingOptions(decoder="beam", hotwords=["zoo"]))


def test_blank_penalty_spells_a_letter_heard_below_the_blank():
    # "b", then an "a" the network ranks below the blank, then "d": best path and a plain search drop the "a"
    spec = [{"b": 0.95}, {"_": 0.9}, {"_": 0.6, "a": 0.39}, {"_": 0.9}, {"d": 0.95}]
    lp, lengths = _posteriors(spec)[None], torch.tensor([len(spec)])
    free = {"decoder": "beam", "lexicon": False}
    assert BeamSearchDecoder(VOCAB, None, DecodingOptions(**free)).decode(lp, lengths, 0.04)[0].text == "bd"
    penalised = BeamSearchDecoder(VOCAB, None, DecodingOptions(**free, blank_penalty=1.0)).decode(lp, lengths, 0.04)
    assert penalised[0].text == "bad"
    assert penalised[0].words[0].confidence == pytest.approx((0.95 + 0.39 + 0.95) / 3, abs=0.01)  # not penalised
    for bad in ("1", float("nan"), float("inf"), None):
        with pytest.raises(asr.errors.OptionsError, match="blank_penalty"):
            DecodingOptions(blank_penalty=bad)


def test_runs_of_sure_blanks_are_searched_as_one_frame(tone_lm):
    # 20 sure blanks, "egg" with 20 sure blanks between the two g's (under the 1 s that would cut the search in
    # two pieces), then an unsure blank and more sure ones
    sure, unsure = {"_": 1.0}, {"_": 0.99}
    spec = [sure] * 20 + [{"e": 0.9}, {"g": 0.9}] + [sure] * 20 + [{"g": 0.9}, unsure] + [sure] * 10
    lp = _posteriors(spec)
    lp[[i for i, frame in enumerate(spec) if frame is sure]] = torch.full((len(VOCAB),), 1e-6).index_fill(
        0, torch.tensor([VOCAB.blank]), 1 - 1e-6 * (len(VOCAB) - 1)).log()  # blank above SKIP_BLANK
    assert lp[0, VOCAB.blank].exp() > SKIP_BLANK > lp[-11, VOCAB.blank].exp()
    assert searched_frames(lp, VOCAB.blank).tolist() == [0, 20, 21, 22, 42, 43, 44]
    lexicon = BeamSearchDecoder(VOCAB, LanguageModel.load(tone_lm), DecodingOptions(decoder="beam", lm_weight=0.5))
    result = lexicon.decode(lp[None], torch.tensor([len(spec)]), 0.04)[0]
    assert result.text == "egg"  # the blank kept between the g's still parts them
    assert (result.words[0].start, result.words[0].end) == (0.8, 1.72)  # frames 20 to 42 + 1 of the whole emissions
    # a stream feeds the same piece chunk by chunk (serve/streaming.py): the search gets the same frames, runs
    # that go on from one chunk into the next included, and finds the same letters at the same frames
    offline = lexicon._decode_piece(lp)
    fed = []
    step = lexicon._decoder.decode_step
    lexicon._decoder.decode_step = lambda emissions: (fed.append(len(emissions)), step(emissions))[1]
    for chunk in (1, 7, 30, len(spec)):
        fed.clear()
        lexicon.begin_piece()
        for start in range(0, len(spec), chunk):
            lexicon.step_piece(lp[start: start + chunk])
        assert sum(fed) == 7, chunk
        letters = [(c, f) for c, f, _ in offline if c != " "]
        assert [(c, f) for c, f, _ in lexicon.piece_so_far(lp) if c != " "] == letters, chunk
        assert lexicon.end_piece(lp) == offline and "".join(c for c, _, _ in offline).strip() == "egg"


def test_beam_search_on_a_trained_model_with_and_without_lm(trained_tiny_model, tone_corpus, tone_lm, tmp_path):
    files = [str(tone_corpus.parent / f"utt{i}.wav") for i in range(len(TEXTS))]
    model = asr.load_model(trained_tiny_model, lm=tone_lm)
    assert model.decoding.decoder == "greedy" and model.decoding.lexicon  # defaults: greedy; beam spells LM words
    # flashlight's lexicon search can end on a word it never finished spelling ("dig a hole fee" from the
    # tokens "dig a hole f e"); the decoder takes the best hypothesis whose tokens spell its words
    for options in ({"decoder": "beam"}, {"decoder": "beam", "lm_weight": 1.0}, {"decoder": "beam", "lexicon": False},
                    {"decoder": "beam", "beam_size": 12, "lm_weight": 1.0}):
        results = model.transcribe(files, **options)
        assert [r.text for r in results] == TEXTS, options
        for r in results:
            times = [t for w in r.words for t in (w.start, w.end)]
            assert times == sorted(times) and 0 <= times[0] and times[-1] <= r.duration
            assert all(w.start < w.end and 0 < w.confidence <= 1 for w in r.words)
    # tuning stores the LM and the chosen weights in the model folder; load_model then uses them
    folder = tmp_path / "model"
    folder.mkdir()
    for f in trained_tiny_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tuned = tune_beam(model, tone_corpus, lm_weights=[1.0, 2.0], word_scores=[0.0, 1.5], beam_size=20,
                      beam_size_token=5, beam_threshold=15.0, progress=False, blank_penalties=[0.0, 0.5])
    assert len(tuned["grid"]) == 8 and tuned["beam_wer"] <= tuned["greedy_wer"]
    assert {row["blank_penalty"] for row in tuned["grid"]} == {0.0, 0.5}
    assert tuned["decoder"] == ("beam" if tuned["beam_wer"] < tuned["greedy_wer"] else "greedy")
    store_decoder(folder, tone_lm, tuned)
    reloaded = asr.load_model(folder)
    assert reloaded.decoding.decoder == tuned["decoder"]
    assert reloaded.lm is not None and reloaded.decoding.beam_size == 20
    assert (reloaded.decoding.beam_size_token, reloaded.decoding.beam_threshold) == (5, 15.0)
    assert reloaded.decoding.lm_weight == tuned["beam"]["lm_weight"]
    assert reloaded.decoding.blank_penalty == tuned["beam"]["blank_penalty"]
    assert reloaded.transcribe(files[0], decoder="beam").text == TEXTS[0]


def test_a_model_decodes_as_its_decoder_json_says(trained_tiny_model, tone_corpus, tone_lm, tmp_path):
    from asr.serve.evaluate import evaluate_manifest

    folder = tmp_path / "model"
    folder.mkdir()
    for f in trained_tiny_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    store_decoder(folder, tone_lm, {"decoder": "beam", "beam": DecodingOptions(beam_size=20).beam_settings()})
    model = asr.load_model(folder)
    assert (model.decoding.decoder, model.decoding.beam_size) == ("beam", 20)
    # with no decoder asked for, the API, the CLI and the demo decode with the model's beam + LM
    summary = evaluate_manifest(model, tone_corpus, progress=False)
    assert summary["decoder"]["beam"]["beam_size"] == 20 and summary["wer"] == 0
    assert evaluate_manifest(model, tone_corpus, progress=False, decoder="greedy")["decoder"] == "greedy"
    out = subprocess.run([sys.executable, "-m", "asr.cli", "evaluate", "--model", str(folder), "--manifest",
                          str(tone_corpus), "--out", str(tmp_path / "eval"), "--no-progress"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "beam" in json.loads((tmp_path / "eval" / "summary.json").read_text())["decoder"]
    # a decoder.json written before it named a decoder: greedy, as then (bad ones: test_reliability_audio.py)
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    tuned = json.loads((old / "decoder.json").read_text())
    del tuned["decoder"]
    (old / "decoder.json").write_text(json.dumps(tuned))
    assert asr.load_model(old).decoding.decoder == "greedy"
    gr = pytest.importorskip("gradio", reason="the demo needs the demo extra (gradio)")
    from asr.serve.demo import ModelChoices, build_app

    for path, decoder in ((folder, "beam"), (old, "greedy")):
        radios = [b for b in build_app(ModelChoices([str(path)])).blocks.values() if isinstance(b, gr.Radio)]
        assert len(radios) == 2 and {r.value for r in radios} == {decoder}  # the upload tab's and the live tab's


def test_the_demo_builds_a_models_beam_search_before_the_first_request(trained_tiny_model, tone_corpus, tone_lm,
                                                                       tmp_path, monkeypatch):
    """The lexicon and LM of the shipped model's beam search take about a second to set up: the demo does it when it
    loads the model, so its first request is as fast as the next."""
    from asr.serve import demo, transcribe

    folder = tmp_path / "model"
    shutil.copytree(trained_tiny_model, folder)
    store_decoder(folder, tone_lm, {"decoder": "beam", "beam": DecodingOptions(beam_size=20).beam_settings()})
    built = []
    real = transcribe.BeamSearchDecoder
    monkeypatch.setattr(transcribe, "BeamSearchDecoder", lambda *a, **kw: built.append(1) or real(*a, **kw))
    models = demo.ModelChoices([str(folder)])
    models.load_all()
    assert len(built) == 1
    analysis = demo.analyze(models.get(""), str(tone_corpus.parent / "utt0.wav"), "beam", demo.DemoLimits())
    assert analysis.text == TEXTS[0] and len(built) == 1


@pytest.mark.slow
def test_cli_beam_decoding_with_a_hot_word(trained_tiny_model, tone_corpus, tone_lm):
    out = subprocess.run([sys.executable, "-m", "asr.cli", "transcribe", str(tone_corpus.parent / "utt2.wav"),
                          "--model", str(trained_tiny_model), "--lm", str(tone_lm), "--decoder", "beam",
                          "--hotword", "bad egg", "--format", "json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"] == TEXTS[2] and [w["word"] for w in result["words"]] == TEXTS[2].split()


def test_missing_or_corrupt_lm_gives_a_clear_error(tone_lm, trained_tiny_model, tmp_path):
    with pytest.raises(LMError, match="lm.bin is missing"):
        LanguageModel.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tone_lm.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "lm.bin").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(LMError, match="not a KenLM binary"):
        asr.load_model(trained_tiny_model, lm=broken)
    out = subprocess.run([sys.executable, "-m", "asr.cli", "transcribe", "x.wav", "--model", str(trained_tiny_model),
                          "--lm", str(broken), "--decoder", "beam"], capture_output=True, text=True)
    assert out.returncode == 2 and "not a KenLM binary" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(LMError, match="no usable text"):
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n")
        build_lm([empty], tmp_path / "lm-empty")
    with pytest.raises(ValueError, match="needs a language model"):
        BeamSearchDecoder(VOCAB, None, DecodingOptions(decoder="beam", lexicon=True))


def test_weighted_text_lowers_perplexity_on_its_domain(tools, tmp_path):
    """--weights repeats a small in-domain text: perplexity on that kind of sentence falls, and is reported."""
    general = tmp_path / "general.txt"
    general.write_text("\n".join(["the bad one is here", "dig a hole there", "an egg is bad"] * 30) + "\n")
    domain = tmp_path / "domain.jsonl"
    domain.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a bad egg", "dig a bad hole"]))
    test = tmp_path / "test.txt"
    test.write_text("a bad egg\ndig a bad hole\n")
    plain = build_lm([general, domain], tmp_path / "plain", order=3, prune=[0, 0, 0])
    weighted = build_lm([general, domain], tmp_path / "weighted", order=3, prune=[0, 0, 0], weights=[1, 20])
    assert weighted.sentences == plain.sentences + 19 * 2 and weighted.weights == [1, 20]
    assert json.loads((tmp_path / "weighted" / "lm.json").read_text())["weights"] == [1, 20]
    before = perplexity(LanguageModel.load(tmp_path / "plain"), [test])
    after = perplexity(LanguageModel.load(tmp_path / "weighted"), [test])
    assert after.perplexity < 0.8 * before.perplexity
    assert (after.words, after.sentences, after.oov_rate) == (9, 2, 0.0)
    with pytest.raises(LMError, match="one positive whole number per text"):
        build_lm([general, domain], tmp_path / "bad", weights=[1])


def test_missing_build_tools_are_named(monkeypatch, tmp_path):
    import asr.lm.language_model as lm_module

    monkeypatch.setenv("ASR_CACHE", str(tmp_path))
    monkeypatch.setattr(lm_module.shutil, "which", lambda name: None)
    with pytest.raises(LMError, match="cmake.*\n.*apt-get install"):
        kenlm_tools()


def test_cli_passes_the_search_width_to_the_decoder():
    from asr.cli import _decoding_options, build_parser

    args = build_parser().parse_args(["evaluate", "--model", "m", "--manifest", "d.jsonl", "--decoder", "beam",
                                      "--beam-size", "300", "--beam-size-token", "6", "--beam-threshold", "12",
                                      "--blank-penalty", "1.5"])
    assert _decoding_options(args) == {"decoder": "beam", "beam_size": 300, "beam_size_token": 6,
                                       "beam_threshold": 12.0, "blank_penalty": 1.5}
    tune = build_parser().parse_args(["lm", "tune", "--model", "m", "--lm", "l", "--manifest", "d.jsonl",
                                      "--beam-size-token", "6", "--beam-threshold", "12", "--blank-penalties", "0",
                                      "1"])
    assert (tune.beam_size_token, tune.beam_threshold, tune.blank_penalties) == (6, 12.0, [0.0, 1.0])


def test_beam_width_bench_decodes_each_width_once_over_the_same_posteriors(trained_tiny_model, tone_corpus, tone_lm,
                                                                          tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_beam_width",
                                                  Path(__file__).resolve().parents[1] / "bench" / "beam_width.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_beam_width"] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    model = asr.load_model(trained_tiny_model, lm=tone_lm)
    widths = [bench.Width.parse("1:1:1"), bench.Width.parse("20:5:15")]
    rows, audio_seconds = bench.measure(model, str(tone_corpus), widths, lm_weight=1.0)
    assert [r["width"] for r in rows] == ["1:1:1", "20:5:15"] and all(r["lm_weight"] == 1.0 for r in rows)
    assert audio_seconds > 0 and all(r["decode_seconds"] > 0 for r in rows)
    # the wide search finds the corpus's sentences, as transcribe's beam search does; a one-hypothesis beam need not
    assert rows[1]["wer"] == 0.0 and rows[1]["wer"] <= rows[0]["wer"]
    assert "| 20:5:15 | 0.999 | 0.00% |" in bench.table(rows, audio_seconds)
    # other LMs over the same posteriors: each LM at each width, named with the size of its binary
    rows, _ = bench.measure(model, str(tone_corpus), widths[1:], lms=[tone_lm, tone_lm], lm_weight=1.0)
    assert [r["lm"] for r in rows] == [str(tone_lm)] * 2 and all(r["wer"] == 0.0 for r in rows)
    assert rows[0]["lm_mib"] == (Path(tone_lm) / "lm.bin").stat().st_size / 2**20 > 0
    # every frame searched, or runs of sure blanks searched as one: the same text; the search's own value restored
    rows, _ = bench.measure(model, str(tone_corpus), widths[1:], skip_blanks=[1.0, 0.999], lm_weight=1.0)
    assert [r["skip_blank"] for r in rows] == [1.0, 0.999] and all(r["wer"] == 0.0 for r in rows)
    assert beam_search.SKIP_BLANK == SKIP_BLANK
    with pytest.raises(Exception, match="BEAM:TOKENS:THRESHOLD"):
        bench.Width.parse("300:5")
