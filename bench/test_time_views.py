"""Test-time views: greedy WER and CER with the features warped in frequency (vocal tract length normalisation)
or the audio resampled (speed), one factor for every utterance, or chosen per utterance or per speaker by the
network's own confidence (the mean over frames of the best token's log-probability), against no change.

    python bench/test_time_views.py --manifest runs/manifests/dev.jsonl \
        --utt2spk ../shared/data/speechocean762/dev/utt2spk --out exp/views

A warp factor w moves what is at frequency f to w·f in the mel filterbanks (LogMel.raw); a speed factor s plays
the audio s times as fast (resampled, so pitch and formants move by s too). Each view is one more pass of the
network, so a choice among N factors costs N times the network time of plain decoding.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
import torchaudio
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asr import load_model  # noqa: E402
from asr.audio import load_audio  # noqa: E402
from asr.decoding import greedy_decode  # noqa: E402
from asr.device import describe_machine, machine_line  # noqa: E402
from asr.manifest import read_manifest  # noqa: E402
from asr.metrics import error_rates  # noqa: E402

SAMPLE_RATE = 16000


def view_outputs(model, wave: torch.Tensor, kind: str, factor: float) -> tuple[str, float]:
    """The greedy text and the confidence of one view of one waveform."""
    warps = None
    if kind == "warp" and factor != 1.0:
        warps = torch.tensor([factor])
    elif kind == "speed" and factor != 1.0:
        wave = torchaudio.functional.resample(wave, round(SAMPLE_RATE * factor), SAMPLE_RATE)
    log_probs, frames = model.model(wave[None], torch.tensor([wave.shape[0]]), warps=warps)
    log_probs = log_probs[..., model.columns("greedy")]  # a model with word pieces: their output layer
    text = greedy_decode(log_probs, frames, model.vocabulary("greedy"), model.frame_seconds)[0].text
    return text, log_probs[0, : int(frames[0])].max(-1).values.mean().item()


def read_utt2spk(path: str) -> dict[str, str]:
    """Kaldi's utt2spk: one "utterance speaker" pair a line."""
    speaker_of = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if len(fields) != 2 and fields:
            raise SystemExit(f"{path}, line {number}: not an utterance id and a speaker id: {line!r}")
        if fields:
            speaker_of[fields[0]] = fields[1]
    return speaker_of


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder (default: the shipped English model)")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--utt2spk", default=None, help="Kaldi utt2spk of the manifest's ids: adds per-speaker rows")
    parser.add_argument("--warps", type=float, nargs="+", default=[0.8, 0.85, 0.9, 0.95, 1.05, 1.1, 1.15, 1.2])
    parser.add_argument("--speeds", type=float, nargs="+", default=[0.85, 0.9, 0.95, 1.05, 1.1, 1.15])
    parser.add_argument("--limit", type=int, default=0, help="the first N utterances only (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    if not all(0.5 <= f <= 2 for f in args.warps + args.speeds):
        parser.error(f"--warps and --speeds: factors from 0.5 to 2, got {args.warps} and {args.speeds}")

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", backend="torch", precision="fp32")
    utts = read_manifest(args.manifest)[: args.limit or None]
    speaker_of = read_utt2spk(args.utt2spk) if args.utt2spk else {}
    views = [("warp", 1.0)] + [("warp", w) for w in args.warps if w != 1.0] + [
        ("speed", s) for s in args.speeds if s != 1.0]
    outputs: list[dict] = []  # per utterance: {(kind, factor): (text, confidence)}
    with torch.inference_mode():
        for utt in tqdm(utts, desc="utterances"):
            wave = torch.as_tensor(load_audio(utt.audio_filepath))
            outputs.append({view: view_outputs(model, wave, *view) for view in views})
    refs = [u.text for u in utts]

    def scored(name: str, chosen: list[tuple[str, float]]) -> dict:
        hypotheses = [outputs[i][v][0] for i, v in enumerate(chosen)]
        rates = error_rates(refs, hypotheses)
        counts = collections.Counter(f for _, f in chosen)
        return {"view": name, "wer": rates.wer, "cer": rates.cer,
                "factors": {f"{f:g}": counts[f] for f in sorted(counts)}, "hypotheses": hypotheses}

    plain = ("warp", 1.0)
    rows = [scored("none", [plain] * len(utts))]
    rows += [scored(f"{kind} {factor:g}, every utterance", [(kind, factor)] * len(utts)) for kind, factor in views[1:]]
    for kind in ("warp", "speed"):
        choices = [plain] + [v for v in views if v[0] == kind and v != plain]
        if len(choices) == 1:
            continue
        best = [max(choices, key=lambda v: out[v][1]) for out in outputs]
        rows.append(scored(f"{kind}, chosen per utterance", best))
        if speaker_of:
            by_speaker = collections.defaultdict(list)
            for i, utt in enumerate(utts):
                by_speaker[speaker_of.get(utt.id, utt.id)].append(i)
            chosen = [plain] * len(utts)
            for members in by_speaker.values():
                pick = max(choices, key=lambda v: sum(outputs[i][v][1] for i in members))
                for i in members:
                    chosen[i] = pick
            rows.append(scored(f"{kind}, chosen per speaker ({len(by_speaker)} speakers)", chosen))

    machine = describe_machine()
    results = {"model": args.model or "the shipped model", "manifest": args.manifest, "utterances": len(utts),
               "machine": machine, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"{len(utts)} utterances of {args.manifest}, greedy; {machine_line(machine)}", "",
             "| view | WER | CER | factors chosen |", "|---|---|---|---|"]
    for r in rows:
        chosen = ", ".join(f"{f}: {n}" for f, n in r["factors"].items()) if len(r["factors"]) > 1 else ""
        lines.append(f"| {r['view']} | {100 * r['wer']:.2f} % | {100 * r['cer']:.2f} % | {chosen} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
