"""CTC beam search through torchaudio's `ctc_decoder` (flashlight-text), with a KenLM word LM and hot words.

Lexicon-constrained search only spells words of the LM's vocabulary (plus any hot words) and scores
each word with the LM; lexicon-free search may spell anything and uses no word LM. Word times and
confidences come from the frames where the best beam emits each character, as in greedy decoding.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .decoding import Transcription, words_from_emissions
from .lm import LanguageModel
from .text import BLANK, Vocabulary, normalize_text

_BLANK, _SEP = "-", "|"  # flashlight's names for the CTC blank and the word separator
NBEST = 4  # lexicon search: the best hypothesis whose tokens spell its words wins


@dataclass
class BeamSearchOptions:
    beam_size: int = 50  # hypotheses kept per frame
    beam_size_token: int | None = 3  # most likely tokens tried per frame (None: all)
    beam_threshold: float = 10.0  # drop hypotheses this far (log) below the best
    lm_weight: float = 0.5  # alpha: weight of the LM's log10-probability
    word_score: float = 0.0  # beta: bonus per word (counters the LM's preference for few words)
    unk_score: float = -math.inf  # score of words outside the lexicon (lexicon search)
    lexicon: bool = True  # spell only known words (needs an LM); False: any spelling, no word LM
    hotwords: list[str] = field(default_factory=list)  # words or phrases to favour at this call
    hotword_weight: float = 8.0  # added to the LM log10-probability of each hot word (before alpha)


def _boosted_lm(kenlm, boosts: dict[int, float]):
    """An LM that scores like `kenlm` but adds a bonus to the chosen word indices."""
    from torchaudio.models.decoder import CTCDecoderLM

    class BoostedLM(CTCDecoderLM):
        def start(self, start_with_nothing):
            return kenlm.start(start_with_nothing)

        def score(self, state, usr_token_idx):
            next_state, score = kenlm.score(state, usr_token_idx)
            return next_state, score + boosts.get(usr_token_idx, 0.0)

        def finish(self, state):
            return kenlm.finish(state)

    return BoostedLM()


class BeamSearchDecoder:
    """Batched CTC beam search for a vocabulary, an optional KenLM model and options."""

    def __init__(self, vocab: Vocabulary, lm: LanguageModel | None, options: BeamSearchOptions | None = None):
        from torchaudio.models.decoder import ctc_decoder

        self.vocab = vocab
        self.options = opts = options or BeamSearchOptions()
        if opts.lexicon and lm is None:
            raise ValueError("lexicon-constrained beam search needs a language model (or lexicon=False)")
        tokens = [_BLANK if t == BLANK else (_SEP if t == " " else t) for t in vocab.tokens]
        self._tmp = tempfile.TemporaryDirectory(prefix="asr-beam-")
        lexicon = lm_arg = None
        if opts.lexicon:
            hot = sorted({w for phrase in opts.hotwords for w in normalize_text(phrase).split()})
            allowed = set(vocab.tokens[1:]) - {" "}
            bad = [w for w in hot if not set(w) <= allowed]
            if bad:
                raise ValueError(f"hot words with characters the model cannot emit: {bad}")
            lexicon = Path(self._tmp.name) / "lexicon.txt"
            extra = [w for w in hot if w not in set(lm.words)]
            lexicon.write_text(lm.lexicon.read_text() + "".join(f"{w}\t{' '.join(w)}\n" for w in extra))
            lm_arg = str(lm.binary)
            if hot:
                from flashlight.lib.text.decoder.kenlm import KenLM
                from flashlight.lib.text.dictionary import create_word_dict, load_words

                word_dict = create_word_dict(load_words(str(lexicon)))  # as ctc_decoder builds it
                boosts = {word_dict.get_index(w): opts.hotword_weight for w in hot}
                lm_arg = _boosted_lm(KenLM(str(lm.binary), word_dict), boosts)
        self._decoder = ctc_decoder(
            lexicon=str(lexicon) if lexicon else None, tokens=tokens, lm=lm_arg, nbest=NBEST if lexicon else 1,
            beam_size=opts.beam_size, beam_size_token=opts.beam_size_token, beam_threshold=opts.beam_threshold,
            lm_weight=opts.lm_weight if lexicon else 0.0, word_score=opts.word_score, unk_word="<unk>",
            unk_score=opts.unk_score, sil_score=0.0, blank_token=_BLANK, sil_token=_SEP, log_add=False)

    def _spells_its_words(self, hyp) -> bool:
        """Whether a lexicon hypothesis's letters are exactly its words' letters. Flashlight's lexicon search
        sometimes ends on a word whose spelling it never finished (tokens "hole f e", words "hole fee")."""
        chars = "".join(self.vocab.tokens[i] for i in hyp.tokens.tolist() if i != self.vocab.blank)
        return "".join(chars.split()) == "".join(hyp.words)  # it may also leave out a word separator

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor, frame_seconds: float,
               time_offset: float = 0.0) -> list[Transcription]:
        """log_probs: (batch, frames, vocab) CTC log-probabilities; lengths: valid frames of each."""
        emissions = log_probs.detach().float().cpu().contiguous()
        results = self._decoder(emissions, lengths.to(torch.int32).cpu())
        out = []
        for b, hyps in enumerate(results):
            if not hyps:
                out.append(Transcription(""))
                continue
            spelled = [h for h in hyps if self._spells_its_words(h)]
            best = spelled[0] if spelled else hyps[0]  # none: the tokens' spelling is the answer
            last = max(0, int(lengths[b]) - 1)  # the closing separator may sit one frame past the end
            ids, frames = best.tokens.tolist(), [min(int(t), last) for t in best.timesteps.tolist()]
            keep = [k for k, i in enumerate(ids) if i != self.vocab.blank]
            emitted = [(self.vocab.tokens[ids[k]], frames[k], math.exp(float(emissions[b, frames[k], ids[k]])))
                       for k in keep]
            if spelled:  # the lexicon's word boundaries, whether or not a separator was emitted
                letters, emitted, start = [e for e in emitted if e[0] != " "], [], 0
                for word in best.words:
                    emitted += letters[start: start + len(word)] + [(" ", 0, 0.0)]
                    start += len(word)
            chars, at, probs = (list(x) for x in zip(*emitted)) if emitted else ([], [], [])
            out.append(words_from_emissions(chars, at, probs, self.vocab, frame_seconds, time_offset))
        return out
