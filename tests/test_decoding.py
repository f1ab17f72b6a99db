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
