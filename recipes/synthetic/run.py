"""A synthetic English speech corpus from text: every installed TTS voice, random speed and pitch, augmented.

    recipes/synthetic/install.sh                       # the engines (apt, contrib/non-free, pip)
    python recipes/synthetic/run.py --out exp/synthetic --train-sentences 6000 --dev-sentences 300

Writes OUT/train.jsonl and OUT/dev.jsonl (dev: voices and sentences never in train), OUT/clean/
(engine output) and OUT/audio/ (augmented: noise, babble, reverb, microphone colouring, telephone,
codecs). A rerun with the same options skips every file already written.
"""

import argparse
import json
import os
from pathlib import Path

from asr.augment import AugmentOptions
from asr.config import ConfigError, from_dict
from asr.tts.corpus import DEFAULT_AUGMENT, make_tts_corpus

TEXT = Path(__file__).resolve().parents[2].parent / "shared/data/text"
DEFAULT_TEXT = [TEXT / "tatoeba_eng/sentences.txt.gz", TEXT / "tts_transcripts/sentences.txt.gz"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="corpus folder")
    parser.add_argument("--text", nargs="+", default=os.environ.get("ASR_TTS_TEXT", "").split() or DEFAULT_TEXT,
                        help="sentence files, one sentence per line, .gz or plain (default: $ASR_TTS_TEXT, else "
                             "Tatoeba and TTS prompts from ../shared/data/text)")
    parser.add_argument("--train-sentences", type=int, default=6000)
    parser.add_argument("--dev-sentences", type=int, default=300)
    parser.add_argument("--voices-per-sentence", type=int, default=1)
    parser.add_argument("--dev-voice-fraction", type=float, default=0.1, help="voices of each engine held out for dev")
    parser.add_argument("--engines", nargs="+", default=None, help="only these engines (default: every installed one)")
    parser.add_argument("--max-words", type=int, default=20)
    parser.add_argument("--sample-rate", type=int, default=16000, help="of the engines' output (8000 for FSDD-like)")
    parser.add_argument("--augment", default=None, help="JSON of AugmentOptions fields replacing the default "
                        f"({json.dumps({k: v for k, v in vars(DEFAULT_AUGMENT).items() if v})}); '{{}}' for none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    try:
        augment = DEFAULT_AUGMENT if args.augment is None else from_dict(AugmentOptions, json.loads(args.augment))
    except (json.JSONDecodeError, ConfigError, ValueError) as e:
        parser.error(f"--augment: {e}")
    manifests = make_tts_corpus(args.out, args.text, args.train_sentences, args.dev_sentences,
                                args.voices_per_sentence, args.dev_voice_fraction, args.engines, args.max_words,
                                augment if augment.active else None, args.sample_rate, args.seed, args.workers,
                                progress=not args.no_progress)
    for split, manifest in manifests.items():
        lines = manifest.read_text().splitlines()
        hours = sum(json.loads(line)["duration"] for line in lines) / 3600
        print(f"{split}: {len(lines)} utterances, {hours:.2f} h -> {manifest}")


if __name__ == "__main__":
    main()
