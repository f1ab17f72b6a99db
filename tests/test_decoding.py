import torch

from asr.decoding import greedy_decode
from asr.text import Vocabulary

VOCAB = Vocabulary()


def posteriors(frames: str, confidence: float = 0.9) -> torch.Tensor:
    """Hand-made log-posteriors: one character per frame, '_' for blank, '|' for space."""
    lp = torch.full((len(frames), len(VOCAB)), (1 - confidence) / (len(VOCAB) - 1))
    for t, ch in enumerate(frames):
        idx = VOCAB.blank if ch == "_" else VOCAB.tokens.index(" " if ch == "|" else ch)
        lp[t, idx] = confidence
    return lp.log()


def test_collapses_repeats_and_uses_blank_to_separate_doubles():
    lp = posteriors("hhe_l_lloo__|_wworrld_")
    [out] = greedy_decode(lp[None], torch.tensor([len(lp)]), VOCAB, frame_seconds=0.02)
    assert out.text == "hello world"


def test_word_times_and_confidence():
    lp = posteriors("__ab__|__cd_")
    [out] = greedy_decode(lp[None], torch.tensor([len(lp)]), VOCAB, frame_seconds=0.1)
    assert [w.word for w in out.words] == ["ab", "cd"]
    assert [(w.start, w.end) for w in out.words] == [(0.2, 0.4), (0.9, 1.1)]
    assert all(abs(w.confidence - 0.9) < 1e-4 for w in out.words)
    [shifted] = greedy_decode(lp[None], torch.tensor([len(lp)]), VOCAB, 0.1, time_offset=5.0)
    assert shifted.words[0].start == 5.2


def test_batch_respects_lengths():
    a, b = posteriors("a_b_c"), posteriors("x_y__")
    batch = torch.stack([a, b])
    outs = greedy_decode(batch, torch.tensor([5, 3]), VOCAB, 0.02)
    assert [o.text for o in outs] == ["abc", "xy"]


def test_all_blank_gives_empty_text():
    lp = posteriors("_____")
    [out] = greedy_decode(lp[None], torch.tensor([5]), VOCAB, 0.02)
    assert out.text == "" and out.words == []


def test_letters_spelled_on_the_first_frames_are_timed_with_the_speech_after_the_silence():
    """A bidirectional model may spell an utterance's first letters on its first frames and the rest of the word
    after the leading silence: the word starts with that speech (the frame before it), not at 0 s."""
    lp = posteriors("tw" + "_" * 30 + "o|_one_")  # 'o' on frame 32 (0.64 s)
    [out] = greedy_decode(lp[None], torch.tensor([len(lp)]), VOCAB, frame_seconds=0.02)
    assert out.text == "two one"
    assert [(w.start, w.end) for w in out.words] == [(0.62, 0.66), (0.7, 0.76)]
    # speech from the first frame on, without a silence after the first letters: times as emitted
    [out] = greedy_decode(posteriors("tw_o|_one_")[None], torch.tensor([10]), VOCAB, frame_seconds=0.02)
    assert [(w.start, w.end) for w in out.words] == [(0.0, 0.08), (0.12, 0.18)]
    # a word spelled whole on the first frames stays there (the speech check judges it)
    for frames in ("a|" + "_" * 30 + "one_", "a" + "_" * 30 + "|one_"):
        [out] = greedy_decode(posteriors(frames)[None], torch.tensor([len(frames)]), VOCAB, frame_seconds=0.02)
        assert [(w.word, w.start) for w in out.words] == [("a", 0.0), ("one", 0.64)]
