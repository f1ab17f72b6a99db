"""CTC beam search through torchaudio's `ctc_decoder` (flashlight-text), with a KenLM word LM and hot words.

Lexicon-constrained search only spells words of the LM's vocabulary (plus any hot words) and scores
each word with the LM; lexicon-free search may spell anything and uses no word LM. Word times and
confidences come from the frames where the best beam emits each character, as in greedy decoding.

Emissions are searched in pieces cut where the model is sure nothing is said: at every pause of a
second or more, and pieces still longer than 30 s at their longest pause. Flashlight's lexicon search
can finish a word on a repeated letter without the blank CTC needs between the two ("will" from the
tokens "w i l"); over minutes of audio every hypothesis of the n-best list carries such a slip
somewhere, and their tokens, glued together, used to be the answer. Now a slip stays within its piece,
and a piece whose hypotheses all have one gives the best one's words.

Within a piece, each run of frames where the blank is all but certain is searched as its first frame only: such
frames do little but extend every hypothesis by a blank (speechocean762 dev's transcripts were the same), and
the search takes less time (bench/beam_width.py --skip-blank). A blank
penalty, subtracted from the blank's log-probability, lets the search spell letters the network hears but
ranks below the blank (a CTC model's commonest error here is a dropped letter).
"""

from __future__ import annotations

import bisect
import difflib
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ..decoding import DecodingOptions, Transcription, words_from_emissions
from ..errors import OptionsError
from ..text import BLANK, Vocabulary, normalize_text, spell_token
from ..word_pieces import WordPieceVocabulary
from .language_model import LanguageModel

_BLANK, _SEP = "-", "|"  # flashlight's names for the CTC blank and the word separator
NBEST = 4  # lexicon search: the best hypothesis whose tokens spell its words wins
SURE_BLANK = 0.9  # a frame whose blank probability is above this has nothing said in it
PAUSE_SECONDS = 1.0  # a run of sure blanks this long inside the audio always ends a piece
PIECE_SECONDS = 30.0  # longer pieces are cut at their longest run of sure blanks
SKIP_BLANK = 0.999  # a run of frames whose blank probability is above this is searched as its first frame
NEVER = -1e4  # the log-probability of the separator that word-piece models never emit

Emitted = tuple[str, int, float]  # a character, its frame and its posterior


def _sure_blank_runs(log_probs: torch.Tensor, blank: int) -> list[tuple[int, int]]:
    """(start, end) frames of each run of sure blanks in emissions (frames, vocab)."""
    edges = torch.nn.functional.pad((log_probs[:, blank] > math.log(SURE_BLANK)).int(), (1, 1)).diff()
    return list(zip((edges == 1).nonzero().squeeze(1).tolist(), (edges == -1).nonzero().squeeze(1).tolist()))


def searched_frames(log_probs: torch.Tensor, blank: int, after_skippable: bool = False) -> torch.Tensor:
    """Indices of the frames of emissions (frames, vocab) that the search needs: all but the second and later
    frames of each run whose blank probability is above SKIP_BLANK (the first still parts two equal letters).
    `after_skippable`: the frame before the first was such a frame (a stream's chunk continues a run)."""
    skip = log_probs[:, blank] > math.log(SKIP_BLANK)
    before = torch.cat([torch.tensor([after_skippable]), skip[:-1]])
    return (~(skip & before)).nonzero().squeeze(1)


def speech_pieces(log_probs: torch.Tensor, blank: int, pause_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """(start, end) frames of consecutive pieces of one utterance's emissions (frames, vocab).

    Cuts fall in the middle of runs of sure blanks inside the utterance: every run of at least
    `pause_frames`, then the longest run of any piece still longer than `max_frames`, until none is.
    """
    frames = len(log_probs)
    runs = [(s, e) for s, e in _sure_blank_runs(log_probs, blank) if 0 < s and e < frames]
    starts, ends = [s for s, _ in runs], [e for _, e in runs]
    cuts = [(s + e) // 2 for s, e in runs if e - s >= pause_frames]
    todo, pieces = list(zip([0, *cuts], [*cuts, frames])), []
    while todo:
        a, b = todo.pop()
        if b - a <= max_frames:
            pieces.append((a, b))
            continue
        inside = runs[bisect.bisect_right(starts, a): bisect.bisect_left(ends, b)]
        if inside:
            s, e = max(inside, key=lambda run: run[1] - run[0])
            cut = (s + e) // 2
        else:
            cut = a + max_frames
        todo += [(a, cut), (cut, b)]
    return sorted(pieces)


def _at_frames(emitted: list[Emitted], frames: list[int]) -> list[Emitted]:
    """Emitted characters with the searched frames they name (indices into `frames`) as the piece's frames."""
    return [(c, frames[f], p) for c, f, p in emitted]


def _spell_words(words: list[str], emitted: list[Emitted]) -> list[Emitted]:
    """The words' letters, a space after each, with the frame and posterior of the emitted letter each aligns
    with (a word piece's letters all have its frame); a letter the tokens lack (the second "l" of "will" from
    "w i l") takes its neighbour's."""
    letters = [(c, f, p) for token, f, p in emitted for c in spell_token(token).strip()]
    spelled = "".join(words)
    aligned: list[int | None] = [None] * len(spelled)
    matcher = difflib.SequenceMatcher(None, spelled, "".join(c for c, _, _ in letters), autojunk=False)
    for i, j, n in matcher.get_matching_blocks():
        aligned[i: i + n] = range(j, j + n)
    known = [k for k, j in enumerate(aligned) if j is not None]
    out, k = [], 0
    for word in words:
        for ch in word:
            near = known[max(0, bisect.bisect_right(known, k) - 1)] if known else None
            _, frame, prob = letters[aligned[near]] if near is not None else ("", 0, 0.0)
            out.append((ch, frame, prob))
            k += 1
        out.append((" ", 0, 0.0))
    return out


def _lexicon_lines(vocab: Vocabulary, words: Iterable[str]) -> str:
    """Flashlight lexicon lines, "word<TAB>its tokens", for each of `words` the vocabulary can spell."""
    return "".join(f"{w}\t{' '.join(tokens)}\n" for w in words if (tokens := vocab.spell_word(w)))


def _lexicon(vocab: Vocabulary, lm: LanguageModel) -> str:
    """The LM's words spelled in the vocabulary's tokens (flashlight's lexicon file): the LM's own lexicon.txt
    for characters; for word pieces, each word the pieces can spell."""
    if not isinstance(vocab, WordPieceVocabulary):
        return lm.lexicon.read_text()
    return _lexicon_lines(vocab, lm.words)


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
    """Batched CTC beam search (a decoding.Decoder) for a vocabulary, an optional KenLM model and the beam fields of
    DecodingOptions."""

    def __init__(self, vocab: Vocabulary, lm: LanguageModel | None, options: DecodingOptions | None = None):
        from torchaudio.models.decoder import ctc_decoder

        self.vocab = vocab
        self.options = opts = options or DecodingOptions(decoder="beam")
        if opts.lexicon and lm is None:
            raise OptionsError("lexicon-constrained beam search needs a language model (or lexicon=False)")
        tokens = [_BLANK if t == BLANK else (_SEP if t == " " else t) for t in vocab.tokens]
        # word pieces carry their word starts; flashlight still needs a separator token, which they never emit
        self._no_separator = _SEP not in tokens
        tokens += [_SEP] if self._no_separator else []
        self._tmp = tempfile.TemporaryDirectory(prefix="asr-beam-")
        lexicon = lm_arg = None
        if opts.lexicon:
            hot = sorted({w for phrase in opts.hotwords for w in normalize_text(phrase).split()})
            bad = [w for w in hot if vocab.spell_word(w) is None]
            if bad:
                raise OptionsError(f"hot words with characters the model cannot emit: {bad}")
            lexicon = Path(self._tmp.name) / "lexicon.txt"
            extra = [w for w in hot if w not in set(lm.words)]
            lexicon.write_text(_lexicon(vocab, lm) + _lexicon_lines(vocab, extra))
            lm.check_binary()  # a damaged binary: LMError here, not a RuntimeError from ctc_decoder
            lm_arg = str(lm.binary)
            if hot:
                from flashlight.lib.text.dictionary import create_word_dict, load_words

                word_dict = create_word_dict(load_words(str(lexicon)))  # as ctc_decoder builds it
                boosts = {word_dict.get_index(w): opts.hotword_weight for w in hot}
                lm_arg = _boosted_lm(lm.kenlm(word_dict), boosts)
        self._lexicon = lexicon is not None
        self._decoder = ctc_decoder(
            lexicon=str(lexicon) if lexicon else None, tokens=tokens, lm=lm_arg, nbest=NBEST if lexicon else 1,
            beam_size=opts.beam_size, beam_size_token=opts.beam_size_token, beam_threshold=opts.beam_threshold,
            lm_weight=opts.lm_weight if lexicon else 0.0, word_score=opts.word_score, unk_word="<unk>",
            unk_score=opts.unk_score, sil_score=0.0, blank_token=_BLANK, sil_token=_SEP, log_add=False)

    def _spells_its_words(self, hyp) -> bool:
        """Whether a lexicon hypothesis's letters are exactly its words' letters. Flashlight's lexicon search
        sometimes ends on a word whose spelling it never finished (tokens "hole f e", words "hole fee")."""
        chars = "".join(spell_token(self._token(i)) for i in hyp.tokens.tolist() if i != self.vocab.blank)
        return "".join(chars.split()) == "".join(hyp.words)  # it may also leave out a word separator

    def _token(self, index: int) -> str:
        """The vocabulary's token at a flashlight token index (the separator added for word pieces: a space)."""
        return self.vocab.tokens[index] if index < len(self.vocab) else " "

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor, frame_seconds: float,
               time_offset: float = 0.0) -> list[Transcription]:
        """log_probs: (batch, frames, vocab) CTC log-probabilities; lengths: valid frames of each."""
        emissions = log_probs.detach().float().cpu()
        pause, longest = round(PAUSE_SECONDS / frame_seconds), max(1, round(PIECE_SECONDS / frame_seconds))
        out = []
        for b in range(len(emissions)):
            emitted: list[Emitted] = []
            for start, end in speech_pieces(emissions[b, : int(lengths[b])], self.vocab.blank, pause, longest):
                piece = self._decode_piece(emissions[b, start:end].contiguous()) if end > start else []
                emitted += [(c, start + f, p) for c, f, p in piece] + [(" ", 0, 0.0)]
            chars, at, probs = (list(x) for x in zip(*emitted)) if emitted else ([], [], [])
            out.append(words_from_emissions(chars, at, probs, frame_seconds, time_offset))
        return out

    def _decode_piece(self, emissions: torch.Tensor) -> list[Emitted]:
        """The characters the best hypothesis emits over emissions (frames, vocab), frames counted from 0.

        Lexicon search takes the best hypothesis whose tokens spell its words, else the best one's words.
        """
        kept = searched_frames(emissions, self.vocab.blank)
        searched = self._penalized(emissions[kept])
        hyps = self._decoder(searched[None], torch.tensor([len(searched)], dtype=torch.int32))[0]
        return _at_frames(self._best_emitted(hyps, searched), kept.tolist())

    def _penalized(self, emissions: torch.Tensor) -> torch.Tensor:
        """The emissions the search scores: the blank's log-probability lowered by the blank penalty (a copy, or
        the same tensor when there is none), and for word pieces a never-emitted separator column; the tokens'
        posteriors, which give confidences, are unchanged."""
        if self._no_separator:
            emissions = torch.cat([emissions, torch.full((len(emissions), 1), NEVER)], dim=1)
        if not self.options.blank_penalty:
            return emissions.contiguous()
        searched = emissions.clone()
        searched[:, self.vocab.blank] -= self.options.blank_penalty
        return searched

    def _best_emitted(self, hyps: list, emissions: torch.Tensor) -> list[Emitted]:
        """What _decode_piece returns, from flashlight's n-best hypotheses over a piece's emissions."""
        if not hyps:
            return []
        best = next((h for h in hyps if self._spells_its_words(h)), hyps[0]) if self._lexicon else hyps[0]
        emitted = self._emitted(best, emissions)
        return _spell_words(best.words, emitted) if self._lexicon else emitted

    def _emitted(self, hyp, emissions: torch.Tensor) -> list[Emitted]:
        """A hypothesis's non-blank tokens with their frames and posteriors."""
        # flashlight's path starts with the state before the first frame, so torchaudio's timesteps count one frame
        # too many (and the closing separator's lies past the end)
        last = len(emissions) - 1
        ids, frames = hyp.tokens.tolist(), [min(max(int(t) - 1, 0), last) for t in hyp.timesteps.tolist()]
        return [(self._token(i), f, math.exp(float(emissions[f, i])))
                for i, f in zip(ids, frames) if i != self.vocab.blank]

    # Incremental search of one piece at a time, for streaming (serve/streaming.py). Flashlight keeps the search
    # in the decoder, so such a BeamSearchDecoder serves one stream and nothing else (not ASRModel.decoder's).

    def begin_piece(self) -> None:
        """Start searching a new piece; `step_piece` feeds it frames, `end_piece` finishes it."""
        self._decoder.decode_begin()
        self._searched: list[int] = []  # the piece's frames the search has had (searched_frames, chunk by chunk)
        self._fed = 0  # the piece's frames so far
        self._last_skippable = False  # whether the last of them is above SKIP_BLANK

    def step_piece(self, emissions: torch.Tensor) -> None:
        """Search on through the piece's next frames: emissions (frames, vocab). Like `_decode_piece`, the search
        skips all but the first frame of each run above SKIP_BLANK, runs that go on across calls included."""
        if not len(emissions):
            return
        emissions = emissions.detach().float().cpu()
        kept = searched_frames(emissions, self.vocab.blank, self._last_skippable)
        if len(kept):
            self._decoder.decode_step(self._penalized(emissions[kept]))
        self._searched += (kept + self._fed).tolist()
        self._fed += len(emissions)
        self._last_skippable = bool(emissions[-1, self.vocab.blank] > math.log(SKIP_BLANK))

    def piece_so_far(self, emissions: torch.Tensor) -> list[Emitted]:
        """The characters the best hypothesis at the last frame searched emits (its last word may be unfinished);
        emissions: the piece's frames so far."""
        # torchaudio's CTCDecoder does not offer flashlight's get_best_hypothesis; its decoder does
        hyps = self._decoder._to_hypo([self._decoder.decoder.get_best_hypothesis()])
        return _at_frames(self._emitted(hyps[0], emissions[self._searched]), self._searched)

    def end_piece(self, emissions: torch.Tensor) -> list[Emitted]:
        """Finish the piece; what `_decode_piece` would give for its frames (emissions: all of them)."""
        self._decoder.decode_end()
        return _at_frames(self._best_emitted(self._decoder.get_final_hypothesis(), emissions[self._searched]),
                          self._searched)
