"""A synthetic speech corpus: sentences from text files spoken by text-to-speech voices, then augmented.

Train and dev use different voices (dev voices are held out per engine) and different sentences, so
dev measures how well a model trained on synthetic speech carries over to a voice it never heard.
Everything derives from one seed and each file's own key: a rerun skips finished files and gives the
same corpus, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import soundfile as sf
import torch
from tqdm import tqdm

from ..audio import SAMPLE_RATE, load_audio
from ..augment import Augmenter, AugmentOptions
from ..files import replaced_atomically, write_text_atomically
from ..lm.language_model import open_text
from ..manifest import Utterance, write_manifest
from ..text import normalize_text
from .engines import SynthesisJob, Voice, available_voices, build_corpus, plan_jobs, require_engines

# what a synthetic corpus gets baked in: real rooms, microphones, phone lines and codecs are what it lacks
DEFAULT_AUGMENT = AugmentOptions(noise_snr_db=[5.0, 30.0], noise_prob=0.3, babble_prob=0.15, reverb_prob=0.3,
                                 eq_prob=0.5, telephone_prob=0.1, codec_prob=0.2)


@dataclass
class CorpusPlan:
    train: list[SynthesisJob]
    dev: list[SynthesisJob]
    train_voices: list[Voice]
    dev_voices: list[Voice]


def read_sentences(paths: Sequence[str | os.PathLike], min_words: int = 2, max_words: int = 20) -> list[str]:
    """Distinct lines of the text files (.gz or plain) a TTS engine can read aloud as written.

    Lines with digits are dropped: an engine and the text normaliser may say a number differently.
    """
    seen, sentences = set(), []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: sentence file not found")
        with open_text(path) as f:
            for line in f:
                line = " ".join(line.split())
                if not line or any(c.isdigit() for c in line):
                    continue
                words = normalize_text(line).split()
                key = " ".join(words)
                if min_words <= len(words) <= max_words and key not in seen:
                    seen.add(key)
                    sentences.append(line)
    return sentences


def split_voices(voices: Sequence[Voice], dev_fraction: float, seed: int) -> tuple[list[Voice], list[Voice]]:
    """Hold out about `dev_fraction` of each engine's voices (at least one where it has two or more)."""
    train, dev = [], []
    rng = random.Random(seed)
    for engine in sorted({v.engine for v in voices}):
        mine = sorted((v for v in voices if v.engine == engine), key=lambda v: v.id)
        rng.shuffle(mine)
        held = 0 if len(mine) < 2 else max(1, round(dev_fraction * len(mine)))
        dev += mine[:held]
        train += mine[held:]
    return train, dev


def pick_voices(pool: Sequence[Voice], count: int, rng: random.Random) -> list[Voice]:
    """`count` distinct voices; an engine is drawn with weight sqrt(its voice count), so that espeak-ng's
    hundreds of variants do not drown the few voices of the other engines."""
    by_engine: dict[str, list[Voice]] = {}
    for v in pool:
        by_engine.setdefault(v.engine, []).append(v)
    chosen: list[Voice] = []
    while len(chosen) < min(count, len(pool)):
        engines = [e for e, vs in by_engine.items() if any(v not in chosen for v in vs)]
        engine = rng.choices(engines, weights=[math.sqrt(len(by_engine[e])) for e in engines])[0]
        chosen.append(rng.choice([v for v in by_engine[engine] if v not in chosen]))
    return chosen


def plan_corpus(sentences: Sequence[str], voices: Sequence[Voice], train_sentences: int, dev_sentences: int,
                voices_per_sentence: int = 1, dev_voice_fraction: float = 0.1, seed: int = 0) -> CorpusPlan:
    """Disjoint train and dev sentences, each said by `voices_per_sentence` voices of its own split."""
    if not voices:
        raise ValueError("no voices to synthesise with")
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    if train_sentences + dev_sentences > len(order):
        raise ValueError(f"asked for {train_sentences} + {dev_sentences} sentences, the text has {len(order)}")
    train_voices, dev_voices = split_voices(voices, dev_voice_fraction, seed)
    if not dev_voices:
        dev_voices = train_voices  # a single voice: dev can only hold out sentences
    rng = random.Random(seed + 1)

    def jobs(indices: list[int], pool: list[Voice], split: str) -> list[SynthesisJob]:
        planned = []
        for i in indices:
            chosen = pick_voices(pool, voices_per_sentence, rng)
            planned += plan_jobs([sentences[i]], chosen, seed=seed, prefix=f"{split}{i:07d}_")
        return planned

    return CorpusPlan(jobs(order[:train_sentences], train_voices, "train"),
                      jobs(order[train_sentences:train_sentences + dev_sentences], dev_voices, "dev"),
                      train_voices, dev_voices)


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(f"aug:{seed}:{key}".encode()).hexdigest()[:15], 16))


def augment_files(utterances: Sequence[Utterance], out_dir: str | os.PathLike, options: AugmentOptions,
                  seed: int = 0, workers: int | None = None, progress: bool = True,
                  description: str = "augmenting") -> list[Utterance]:
    """Write an augmented 16 kHz copy of every utterance to out_dir (skipping copies already there).

    Each file's draws come from a generator seeded by its key; babble is made of other utterances
    of the same list. Returns the new manifest entries, texts unchanged.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def one(utt: Utterance) -> Utterance:
        path = out / f"{utt.id}.flac"
        if not path.exists():
            g = _generator(seed, utt.id)

            def source() -> torch.Tensor:  # babble: another utterance of the list
                return load_audio(utterances[int(torch.randint(len(utterances), (), generator=g))].audio_filepath)

            wave = Augmenter(options, SAMPLE_RATE, source)(load_audio(utt.audio_filepath), g)
            with replaced_atomically(path) as (tmp,):  # never a half-written file under the real name
                sf.write(tmp, wave.numpy(), SAMPLE_RATE, format="FLAC")
        return Utterance(str(path), sf.info(path).duration, utt.text, utt.id)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(tqdm(pool.map(one, utterances), total=len(utterances), desc=description, disable=not progress))


def build_tts_corpus(plan: CorpusPlan, out_dir: str | os.PathLike, augment: AugmentOptions | None = DEFAULT_AUGMENT,
                     sample_rate: int = 16_000, seed: int = 0, workers: int | None = None,
                     progress: bool = True) -> dict[str, Path]:
    """Synthesise (out/clean), augment (out/audio) and write out/train.jsonl and out/dev.jsonl.

    Manifest texts are normalised; `progress` shows tqdm bars.
    """
    out = Path(out_dir)
    manifests = {}
    for split, jobs in (("train", plan.train), ("dev", plan.dev)):
        clean = build_corpus(jobs, out / "clean", out / f"{split}_clean.jsonl", sample_rate=sample_rate,
                             workers=workers, progress=progress, description=f"synthesising {split}")
        clean = [Utterance(u.audio_filepath, u.duration, normalize_text(u.text), u.id) for u in clean]
        final = clean if augment is None or not augment.active else augment_files(
            clean, out / "audio", augment, seed, workers, progress, f"augmenting {split}")
        manifests[split] = out / f"{split}.jsonl"
        write_manifest(final, manifests[split])
    return manifests


def make_tts_corpus(out_dir: str | os.PathLike, text: Sequence[str | os.PathLike], train_sentences: int,
                    dev_sentences: int, voices_per_sentence: int = 1, dev_voice_fraction: float = 0.1,
                    engines: Sequence[str] | None = None, max_words: int = 20,
                    augment: AugmentOptions | None = DEFAULT_AUGMENT, sample_rate: int = 16_000, seed: int = 0,
                    workers: int | None = None, progress: bool = True) -> dict[str, Path]:
    """Sentences from `text` said by every installed voice (of `engines`): out/train.jsonl, out/dev.jsonl."""
    voices = available_voices(*([engines] if engines else []))
    require_engines(voices)
    sentences = read_sentences(text, max_words=max_words)
    plan = plan_corpus(sentences, voices, train_sentences, dev_sentences, voices_per_sentence, dev_voice_fraction,
                       seed)
    print(f"{len(sentences)} usable sentences; {len(plan.train_voices)} train voices, {len(plan.dev_voices)} dev "
          f"voices ({', '.join(v.id for v in plan.dev_voices)}); {len(plan.train)} + {len(plan.dev)} files", flush=True)
    manifests = build_tts_corpus(plan, out_dir, augment, sample_rate, seed, workers, progress)
    write_text_atomically(Path(out_dir) / "voices.json", json.dumps(
        {"train": [v.id for v in plan.train_voices], "dev": [v.id for v in plan.dev_voices]}, indent=2))
    return manifests
