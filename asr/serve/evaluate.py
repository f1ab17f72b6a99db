"""Score a model on a manifest through `ASRModel`, the path `transcribe` takes: hypotheses, WER/CER and CTC loss."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from ..audio import SAMPLE_RATE, load_audio
from ..decoding import Transcription
from ..errors import ASRError
from ..files import replaced_atomically
from ..manifest import Utterance, read_manifest
from ..metrics import error_rates, utterance_wer
from .transcribe import ASRModel

GROUP = 256  # utterances whose audio is in memory at once (posteriors batch them further, by length)
LOADERS = 4  # threads reading audio files (decoding releases the GIL)


class ResultsError(ASRError, OSError):
    """Scoring results that cannot be written (e.g. a full disk); the previous results are kept."""


@torch.no_grad()
def evaluate_utterances(model: ASRModel, utterances: list[Utterance], progress: bool = True, **options
                        ) -> tuple[list[Transcription], float]:
    """Transcripts of the utterances, in their order, with `options` as for `model.transcribe`; and their CTC
    loss (summed over each utterance's frames, mean over utterances). An unreadable file is an AudioError."""
    opts, decoding = model.options(**options)  # resolved once, before any audio is read
    order = sorted(range(len(utterances)), key=lambda i: utterances[i].duration)
    results: list[Transcription | None] = [None] * len(utterances)
    total_loss = 0.0
    with ThreadPoolExecutor(LOADERS) as pool, tqdm(total=len(utterances), desc="decoding", disable=not progress,
                                                    leave=False) as bar:
        for g in range(0, len(order), GROUP):
            group = [utterances[i] for i in order[g: g + GROUP]]
            waves = list(pool.map(lambda u: load_audio(u.audio_filepath), group))
            for i, utt, wave, log_probs in zip(order[g: g + GROUP], group, waves, model.posteriors(waves, opts)):
                targets = torch.tensor(model.vocab.encode(utt.text), dtype=torch.long)
                chars = log_probs[:, : len(model.vocab)]  # the first output layer's (a model may have word pieces)
                total_loss += torch.nn.functional.ctc_loss(
                    chars, targets, torch.tensor([len(log_probs)]), torch.tensor([len(targets)]),
                    blank=model.vocab.blank, reduction="sum", zero_infinity=True).item()
                results[i] = model.decode_with(log_probs, len(wave) / SAMPLE_RATE, decoding, opts.speech_check, wave)
            bar.update(len(group))
    return results, total_loss / max(1, len(utterances))  # type: ignore[return-value]


def evaluate_manifest(model: ASRModel, manifest: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                      progress: bool = True, **options) -> dict:
    """Score a model on a manifest (`options` as for `model.transcribe`). Writes `hypotheses.jsonl` and
    `summary.json` to out_dir if given."""
    utterances = read_manifest(manifest)
    _, decoding = model.options(**options)
    start = time.perf_counter()
    hyps, loss = evaluate_utterances(model, utterances, progress, **options)
    elapsed = time.perf_counter() - start
    rates = error_rates([u.text for u in utterances], [h.text for h in hyps])
    audio_seconds = sum(h.duration for h in hyps)
    summary = {"manifest": str(manifest), "utterances": len(utterances), **rates.to_dict(),
               "ctc_loss": round(loss, 4), "audio_seconds": round(audio_seconds, 2),
               "decode_seconds": round(elapsed, 2), "real_time_factor": round(elapsed / max(audio_seconds, 1e-9), 5),
               "device": str(model.device), "backend": model.backend,
               "decoder": "greedy" if decoding.decoder == "greedy" else {"beam": decoding.beam_settings()}}
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
