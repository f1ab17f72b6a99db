"""The default English model: synthetic speech, speechocean762 train and four FSDD speakers.

    recipes/synthetic/install.sh
    python recipes/english/run.py --out exp/english --beam --ship

--mode finetune (default): pretrain on the synthetic corpus (picked on its held-out voices), then train
on the real speech from those weights (picked on speechocean762 dev); it beat mixed on real speech
for the same audio (README.md).
--mode mixed: one run on all three, the checkpoint picked on speechocean762 dev.
Scored on speechocean762 dev, the fifth FSDD speaker and the synthetic dev voices. --beam adds an LM
from the training transcripts and ../shared/data/text (never a dev transcript), tuned on
speechocean762 dev. --ship stores OUT/best (fp16) with its LM as the package's default model.
"""

import argparse
import copy
import shlex
import sys
from pathlib import Path

from asr.manifest import read_manifest, write_manifest
from asr.serve.packaging import DEFAULT_MODEL_DIR, ship_model
from asr.train.corpora import prepare_fsdd, prepare_kaldi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/driver.py
from asr.tts.corpus import make_tts_corpus
from driver import recipe_arguments, run_experiment

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1].parent / "shared/data"
TTS_TEXT = [SHARED / "text/tatoeba_eng/sentences.txt.gz", SHARED / "text/tts_transcripts/sentences.txt.gz"]
LM_TEXT = [SHARED / "text/gutenberg/lm_norm.txt.gz", SHARED / "text/tatoeba_eng/lm_norm.txt.gz",
           SHARED / "text/tts_transcripts/lm_norm.txt.gz"]


def concatenate(manifests: list[Path], out: Path) -> Path:
    write_manifest([u for m in manifests for u in read_manifest(m)], out)
    return out


def main() -> None:
    parser = recipe_arguments(__doc__, "SPEECHOCEAN762_DIR", str(SHARED / "speechocean762"), HERE / "cpu.yaml")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--fsdd", default=str(SHARED / "fsdd"), help="FSDD folder (theo is the test speaker)")
    parser.add_argument("--mode", choices=("finetune", "mixed"), default="finetune")
    parser.add_argument("--pretrain-epochs", type=int, default=2, help="--mode finetune: epochs on synthetic speech")
    parser.add_argument("--train-sentences", type=int, default=6000, help="synthetic training sentences")
    parser.add_argument("--dev-sentences", type=int, default=300, help="synthetic dev sentences (held-out voices)")
    parser.add_argument("--tts-text", nargs="+", default=[str(p) for p in TTS_TEXT],
                        help="sentence files to synthesise")
    parser.add_argument("--tts-engines", nargs="+", help="only these TTS engines (default: every installed one)")
    parser.add_argument("--synthetic", help="synthetic corpus folder (default OUT/synthetic; shared between runs)")
    parser.add_argument("--ship", nargs="?", const=str(DEFAULT_MODEL_DIR), metavar="DIR",
                        help=f"store the best model and its LM as the default model (default {DEFAULT_MODEL_DIR})")
    args = parser.parse_args()
    if args.beam and not args.lm_text:
        args.lm_text, args.lm_order = [str(p) for p in LM_TEXT], max(args.lm_order, 4)
    out = Path(args.out)
    command = shlex.join(["python", *sys.argv])
    corpus = make_tts_corpus(args.synthetic or out / "synthetic", args.tts_text, args.train_sentences,
                             args.dev_sentences, engines=args.tts_engines, progress=not args.no_progress)
    manifests = out / "manifests"
    so_train = prepare_kaldi(Path(args.data) / "train", manifests / "so762_train.jsonl")
    so_dev = prepare_kaldi(Path(args.data) / "dev", manifests / "so762_dev.jsonl")
    fsdd = prepare_fsdd(args.fsdd, manifests / "fsdd")
    real = [so_train, fsdd["train"]]
    tests = {"fsdd-theo-unseen": fsdd["test"], "synthetic-dev-voices": corpus["dev"]}

    if args.mode == "mixed":
        train = concatenate([corpus["train"], *real], manifests / "train_mixed.jsonl")
        result = run_experiment(args, train, so_dev, tests, command)
    else:
        pre = copy.copy(args)
        pre.out, pre.beam = str(out / "pretrain"), False
        pre.overrides = [*args.overrides, f"train.epochs={args.pretrain_epochs}"]
        run_experiment(pre, corpus["train"], corpus["dev"], {}, command)
        args.overrides = [*args.overrides, f"train.init_from={out / 'pretrain' / 'best'}"]
        train = concatenate(real, manifests / "train_real.jsonl")
        result = run_experiment(args, train, so_dev, tests, command)
    if args.ship and result:
        size = ship_model(out / "best", args.ship, lm=out / "lm" if args.beam else None)
        print(f"default model stored in {args.ship} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
