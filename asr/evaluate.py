"""Decode a manifest in length-sorted batches and score it: per-utterance hypotheses and a summary."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .audio import SAMPLE_RATE
from .beam_search import BeamSearchDecoder
from .data import BucketBatchSampler, SpeechDataset, Utterance, collate, read_manifest
from .decoding import Transcription, greedy_decode
from .device import autocast
from .errors import ASRError
from .files import replaced_atomically
from .metrics import error_rates, utterance_wer
from .model import DeepSpeech2
from .text import Vocabulary


class ResultsError(ASRError, OSError):
    """Scoring results that cannot be written (e.g. a full disk); the previous results are kept."""


@torch.no_grad()
def decode_utterances(model: DeepSpeech2, vocab: Vocabulary, utterances: list[Utterance],
                      max_batch_seconds: float = 300.0, num_workers: int = 0, progress: bool = True,
                      autocast_dtype: torch.dtype | None = None, beam: BeamSearchDecoder | None = None
                      ) -> tuple[list[Transcription], float]:
    """Transcripts in manifest order (greedy, or `beam` search), and the summed CTC loss per utterance (mean)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sampler = BucketBatchSampler([u.duration for u in utterances], max_batch_seconds, shuffle=False)
    loader = DataLoader(SpeechDataset(utterances, vocab), batch_sampler=sampler, collate_fn=collate,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    results: list[Transcription | None] = [None] * len(utterances)
    index_of = {}
    for i, u in enumerate(utterances):
        index_of.setdefault(u.id, []).append(i)
    total_loss = 0.0
    decode = greedy_decode if beam is None else lambda lp, lengths, _, seconds: beam.decode(lp, lengths, seconds)
    for batch in tqdm(loader, desc="decoding", disable=not progress, leave=False):
        if batch["unreadable"]:  # failed in a loader worker: raised here, as the AudioError it was
            raise batch["unreadable"][0].error()
        waves = batch["waves"].to(device, non_blocking=True)
        lengths = batch["wave_lengths"].to(device)
        with autocast(device, autocast_dtype):
            log_probs, out_lengths = model(waves, lengths)
        total_loss += torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1), batch["targets"].to(device), out_lengths, batch["target_lengths"].to(device),
            blank=vocab.blank, reduction="sum", zero_infinity=True).item()
        for utt_id, wave_len, hyp in zip(batch["ids"], batch["wave_lengths"].tolist(),
                                         decode(log_probs, out_lengths, vocab, model.config.frame_seconds)):
            hyp.duration = round(wave_len / SAMPLE_RATE, 3)
            results[index_of[utt_id].pop()] = hyp
    if was_training:
        model.train()
    return results, total_loss / len(utterances)  # type: ignore[return-value]


def evaluate_manifest(model: DeepSpeech2, vocab: Vocabulary, manifest: str | os.PathLike,
                      out_dir: str | os.PathLike | None = None, max_batch_seconds: float = 300.0,
                      num_workers: int = 0, progress: bool = True, beam: BeamSearchDecoder | None = None) -> dict:
    """Score a model on a manifest (greedy, or `beam` search). Writes `hypotheses.jsonl` and `summary.json`
    to out_dir if given."""
    utterances = read_manifest(manifest)
    start = time.perf_counter()
    hyps, loss = decode_utterances(model, vocab, utterances, max_batch_seconds, num_workers, progress, beam=beam)
    elapsed = time.perf_counter() - start
    rates = error_rates([u.text for u in utterances], [h.text for h in hyps])
    audio_seconds = sum(h.duration for h in hyps)
    summary = {"manifest": str(manifest), "utterances": len(utterances), **rates.to_dict(),
               "ctc_loss": round(loss, 4), "audio_seconds": round(audio_seconds, 2),
               "decode_seconds": round(elapsed, 2), "real_time_factor": round(elapsed / audio_seconds, 5),
               "device": str(next(model.parameters()).device),
               "decoder": "greedy" if beam is None else {"beam": dataclasses.asdict(beam.options)}}
    if out_dir is not None:  # both files replaced together, only once both are written: a full disk loses nothing
        out = Path(out_dir)
        try:
            with replaced_atomically(out / "hypotheses.jsonl", out / "summary.json") as (hyp_file, summary_file):
                with open(hyp_file, "w", encoding="utf-8") as f:
                    for u, h in zip(utterances, hyps):
                        f.write(json.dumps({"id": u.id, "audio_filepath": u.audio_filepath, "reference": u.text,
                                            "hypothesis": h.text,
                                            "wer": round(utterance_wer(u.text, h.text), 4)}) + "\n")
                summary_file.write_text(json.dumps(summary, indent=2))
        except OSError as e:
            raise ResultsError(f"{out}: cannot write the results ({e.strerror or e}); the previous results there, "
                               "if any, are unchanged") from None
    return summary
