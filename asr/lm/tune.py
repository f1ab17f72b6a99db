"""Choosing the beam search's LM weight (alpha) and word score (beta) on a dev set, and storing them with the model."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ..audio import SAMPLE_RATE, load_audio
from ..checkpoint import DECODER_FILE, LM_DIR
from ..decoding import DecodingOptions
from ..files import write_dir_atomically, write_text_atomically
from ..manifest import Utterance, read_manifest
from ..metrics import error_rates
from ..serve.transcribe import ASRModel
from ..speech_activity import speech_frames

DEFAULT_LM_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
DEFAULT_WORD_SCORES = (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
DEFAULT_BLANK_PENALTIES = (0.0, 1.0)


Heard = list[tuple[torch.Tensor, float, torch.Tensor]]  # (log-probs, seconds, speech frames) per utterance


def hear(model: ASRModel, utts: list[Utterance], progress: bool = True) -> Heard:
    """What decoding needs of each utterance, the network run once (64 files in memory at a time), so that
    many decoder settings can be tried on the same posteriors."""
    heard: Heard = []
    for i in tqdm(range(0, len(utts), 64), desc="posteriors", disable=not progress, leave=False):
        waves = [load_audio(u.audio_filepath) for u in utts[i: i + 64]]
        heard += [(lp, len(w) / SAMPLE_RATE, speech_frames(w)) for w, lp in zip(waves, model.posteriors(waves))]
    return heard


def transcripts(model: ASRModel, heard: Heard, decoding: DecodingOptions) -> list[str]:
    """The text of each heard utterance with these decoding options."""
    return [model.decode_with(lp, seconds, decoding, speech=speech).text for lp, seconds, speech in heard]


def tune_beam(model: ASRModel, manifest: str | os.PathLike, lm_weights: Sequence[float] = DEFAULT_LM_WEIGHTS,
              word_scores: Sequence[float] = DEFAULT_WORD_SCORES, beam_size: int = 50,
              beam_size_token: int | None = DecodingOptions.beam_size_token,
              beam_threshold: float = DecodingOptions.beam_threshold, progress: bool = True,
              blank_penalties: Sequence[float] = DEFAULT_BLANK_PENALTIES) -> dict:
    """WER of every (alpha, beta, blank penalty) on `manifest` with the model's LM, at one search width
    (beam_size, beam_size_token, beam_threshold: wider is slower and rarely worse, so it is chosen, not tuned);
    returns the best, the whole grid, and the decoder the model should use by default: "beam" where the best
    search beats greedy decoding on `manifest`, else "greedy"."""
    if model.lm is None:
        raise ValueError("tuning needs a model loaded with a language model (load_model(path, lm=...))")
    utts = read_manifest(manifest)
    refs = [u.text for u in utts]
    heard = hear(model, utts, progress)
    greedy_wer = error_rates(refs, transcripts(model, heard, model.options(decoder="greedy")[1])).wer
    grid = []
    best = None
    settings = list(itertools.product(blank_penalties, lm_weights, word_scores))
    for penalty, alpha, beta in tqdm(settings, desc="alpha, beta, blank penalty", disable=not progress, leave=False):
        decoding = model.options(decoder="beam", lm_weight=alpha, word_score=beta, blank_penalty=penalty,
                                 beam_size=beam_size, beam_size_token=beam_size_token, beam_threshold=beam_threshold,
                                 lexicon=True, hotwords=[])[1]
        start = time.perf_counter()
        rates = error_rates(refs, transcripts(model, heard, decoding))
        row = {"lm_weight": alpha, "word_score": beta, "blank_penalty": penalty, "wer": round(rates.wer, 5),
               "cer": round(rates.cer, 5), "decode_seconds": round(time.perf_counter() - start, 2)}
        grid.append(row)
        if best is None or row["wer"] < best[0]["wer"]:
            best = (row, decoding)
    assert best is not None
    return {"decoder": "beam" if best[0]["wer"] < greedy_wer else "greedy", "manifest": str(manifest),
            "utterances": len(utts), "greedy_wer": round(greedy_wer, 5), "beam_wer": best[0]["wer"],
            "beam": best[1].beam_settings(), "grid": grid}


def store_decoder(model_dir: str | os.PathLike, lm_dir: str | os.PathLike, tuned: dict) -> None:
    """Copy the LM into the model folder (as lm/) and write decoder.json, so load_model uses them by default
    (and decodes with `tuned["decoder"]` unless told otherwise)."""
    model_dir, lm_dir = Path(model_dir), Path(lm_dir)
    if lm_dir.resolve() != (model_dir / LM_DIR).resolve():
        write_dir_atomically(model_dir / LM_DIR, lambda d: [shutil.copy2(p, d / p.name) for p in lm_dir.iterdir()
                                                            if p.is_file()])
    write_text_atomically(model_dir / DECODER_FILE, json.dumps(tuned, indent=2))
