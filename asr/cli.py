"""The `asr` command: prepare, word-pieces, train, average, evaluate, transcribe, export, lm (build, tune, ...) and
demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path

from .audio import AudioError
from .decoding import DECODERS, DecodingOptions
from .errors import ASRError, OptionsError

FORMATS = ("txt", "json", "srt", "vtt")
TRAIN_LAUNCHES = """Train from manifests; resumes from OUT/checkpoints if present.

launches:
  one GPU (or the CPU):
    asr train --config C.yaml --train T.jsonl --dev D.jsonl --out exp/x
  all GPUs of one machine (data parallel, one process per GPU):
    torchrun --standalone --nproc_per_node=gpu -m asr.cli train --config C.yaml ...
  several machines (run on each; OUT must be a folder every machine sees):
    torchrun --nnodes=2 --node_rank=0|1 --nproc_per_node=gpu \\
             --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 -m asr.cli train ...

Each process trains on its own share of every step's batches, so the global batch is
data.max_batch_seconds x processes x train.grad_accumulation; scale train.lr with it.
Rank 0 evaluates, logs and writes checkpoints. A run may resume with a different number of
processes; then the rest of the epoch in progress may repeat or skip a few batches."""


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def format_subtitles(words: list, fmt: str, max_words: int = 10, max_gap: float = 1.0) -> str:
    """SRT or WebVTT cues of up to `max_words` words, split at pauses longer than `max_gap` seconds."""
    cues, current = [], []
    for w in words:
        if current and (len(current) >= max_words or w.start - current[-1].end > max_gap):
            cues.append(current)
            current = []
        current.append(w)
    if current:
        cues.append(current)
    sep = "," if fmt == "srt" else "."
    lines = ["WEBVTT", ""] if fmt == "vtt" else []
    for n, cue in enumerate(cues, start=1):
        if fmt == "srt":
            lines.append(str(n))
        lines.append(f"{_timestamp(cue[0].start, sep)} --> {_timestamp(cue[-1].end, sep)}")
        lines.append(" ".join(w.word for w in cue))
        lines.append("")
    return "\n".join(lines)


def cmd_prepare(args: argparse.Namespace) -> None:
    from .train import corpora
    from .train.corpora import CorpusError

    out = Path(args.out)
    if args.corpus == "fsdd":
        if len(args.data) != 1:
            raise CorpusError(f"fsdd takes one --data folder, got {len(args.data)}: {' '.join(args.data)}")
        paths = corpora.prepare_fsdd(args.data[0], out, test_speaker=args.test_speaker)
    elif args.corpus == "kaldi":
        paths = {Path(d).name: corpora.prepare_kaldi(d, out / f"{Path(d).name}.jsonl") for d in args.data}
    else:
        paths = {Path(d).name: corpora.prepare_librispeech(d, out / f"{Path(d).name}.jsonl") for d in args.data}
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train.distributed import destroy
    from .train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    trainer = Trainer(config, args.train, args.dev, args.out, progress=not args.no_progress)
    try:
        result = trainer.fit(resume=not args.restart)
    finally:
        destroy(trainer.dist)
    if trainer.dist.is_main:
        print(f"best dev WER {result.best_wer:.2%}; model in {result.best_dir}")


def cmd_average(args: argparse.Namespace) -> None:
    from .train.checkpoints import average_checkpoints, last_checkpoints

    if bool(args.run) == bool(args.folders):
        raise OptionsError("give either checkpoint folders or --run (with --last), not both")
    folders = [Path(f) for f in args.folders]
    if args.run:
        if args.last < 1:
            raise OptionsError(f"--last must be at least 1, got {args.last}")
        folders = last_checkpoints(Path(args.run), args.last)
    average_checkpoints(folders, Path(args.out))
    print(f"{args.out}: the mean of {len(folders)} model(s): {' '.join(f.name for f in folders)}")


def cmd_word_pieces(args: argparse.Namespace) -> None:
    from .lm.language_model import normalized_sentences
    from .text import WORD_START, Vocabulary
    from .word_pieces import build_word_pieces

    vocab = build_word_pieces(normalized_sentences(args.text, Vocabulary()), args.vocab_size, args.out)
    whole = sum(t.startswith(WORD_START) and len(t) > 2 for t in vocab.tokens)
    print(f"{args.out}: {len(vocab)} tokens (the blank included), {whole} of them a word start of 2+ letters; "
          f"train with train.tokenizer={args.out}")


def _decoding_options(args: argparse.Namespace) -> dict:
    """The DecodingOptions fields given on the command line (the others stay the model's)."""
    given = {"decoder": args.decoder, "beam_size": args.beam_size, "beam_size_token": args.beam_size_token,
             "beam_threshold": args.beam_threshold, "blank_penalty": args.blank_penalty,
             "lm_weight": args.lm_weight, "word_score": args.word_score, "hotword_weight": args.hotword_weight,
             "lexicon": False if args.no_lexicon else None, "hotwords": args.hotword}
    return {k: v for k, v in given.items() if v is not None}


def _add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `transcribe` and `evaluate`: device, backend, precision, windows and decoding."""
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=["auto", "onnx", "torch"],
                   help="what runs the network (default: $ASR_BACKEND or auto: onnxruntime on the CPU when the "
                        "model folder has model.onnx, else torch)")
    p.add_argument("--precision", choices=["auto", "int8", "fp32"],
                   help="the network's weights (default: $ASR_PRECISION or auto: dynamic int8 where torch runs it on "
                        "the CPU, else fp32)")
    p.add_argument("--chunk-seconds", type=float, default=30.0, help="window length for long audio")
    p.add_argument("--decoder", choices=list(DECODERS),
                   help="greedy or beam (default: the model's, from its decoder.json: beam + LM for the shipped "
                        "model; greedy for a model without one)")
    p.add_argument("--lm", help="language model folder (asr lm build); default: the model folder's lm/")
    p.add_argument("--beam-size", type=int, help="beam search: hypotheses kept (default: tuned or 50)")
    p.add_argument("--beam-size-token", type=int, help="beam search: most likely characters tried per frame "
                   "(default: tuned or 3)")
    p.add_argument("--beam-threshold", type=float, help="beam search: drop hypotheses this far below the best "
                   "(default: tuned or 10)")
    p.add_argument("--lm-weight", type=float, help="beam search: alpha (default: the model's tuned value)")
    p.add_argument("--word-score", type=float, help="beam search: beta (default: the model's tuned value)")
    p.add_argument("--blank-penalty", type=float, help="beam search: subtracted from the blank's log-probability "
                   "(default: the model's tuned value, else 0)")
    p.add_argument("--no-lexicon", action="store_true", help="beam search: allow any spelling, no word LM")
    p.add_argument("--hotword", action="append", metavar="WORDS", help="beam search: boost a word or phrase "
                   "(repeatable)")
    p.add_argument("--hotword-weight", type=float, help="beam search: log-probability bonus of hot words (8)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .serve.evaluate import evaluate_manifest
    from .serve.transcribe import load_model

    model = load_model(args.model, device=args.device, lm=args.lm, backend=args.backend, precision=args.precision)
    summary = evaluate_manifest(model, args.manifest, args.out, progress=not args.no_progress,
                                chunk_seconds=args.chunk_seconds, **_decoding_options(args))
    print(json.dumps(summary, indent=2))


def cmd_lm(args: argparse.Namespace) -> None:
    from .lm.kenlm_tools import kenlm_tools
    from .lm.language_model import LanguageModel, build_lm, perplexity
    from .lm.tune import DEFAULT_BLANK_PENALTIES, store_decoder, tune_beam
    from .serve.transcribe import load_model

    if args.lm_command == "tools":
        print("\n".join(map(str, kenlm_tools(args.kenlm_source, quiet=False))))
    elif args.lm_command == "build":
        info = build_lm(args.text, args.out, order=args.order, prune=args.prune, max_vocabulary=args.max_vocabulary,
                        kenlm_source=args.kenlm_source, weights=args.weights, quantize_bits=args.quantize)
        print(f"{args.out}: {info.order}-gram over {info.words:,} words of {info.sentences:,} sentences, "
              f"vocabulary {info.vocabulary:,}")
    elif args.lm_command == "perplexity":
        result = perplexity(LanguageModel.load(args.lm), args.text)
        print(f"{args.lm}: perplexity {result.perplexity:.1f} on {result.words:,} words of {result.sentences:,} "
              f"sentences (ends counted), {result.oov_rate:.2%} outside its vocabulary")
    else:
        model = load_model(args.model, device=args.device, lm=args.lm)
        tuned = tune_beam(model, args.manifest, args.lm_weights, args.word_scores, args.beam_size,
                          args.beam_size_token, args.beam_threshold, progress=not args.no_progress,
                          blank_penalties=args.blank_penalties or DEFAULT_BLANK_PENALTIES)
        store_decoder(args.model, args.lm, tuned)
        b = tuned["beam"]
        print(f"{args.manifest}: greedy WER {tuned['greedy_wer']:.2%}, beam + LM WER {tuned['beam_wer']:.2%} "
              f"(lm_weight {b['lm_weight']}, word_score {b['word_score']}, blank_penalty {b['blank_penalty']}, "
              f"beam {b['beam_size']}, "
              f"{b['beam_size_token']} characters a frame, threshold {b['beam_threshold']}); "
              f"stored in {args.model}, which now decodes with "
              f"{'beam + LM' if tuned['decoder'] == 'beam' else 'greedy'} unless --decoder says otherwise")


def cmd_export(args: argparse.Namespace) -> None:
    from .serve.onnx_export import export_onnx

    try:
        print(export_onnx(args.model, args.out))
    except ImportError as e:
        sys.exit(f"asr export: error: {e}")


def cmd_transcribe(args: argparse.Namespace) -> None:
    from .serve.transcribe import load_model

    model = load_model(args.model, device=args.device, lm=args.lm, backend=args.backend, precision=args.precision)
    if args.stream:
        return _transcribe_stream(model, args)
    if args.rate is not None or args.realtime:
        raise OptionsError("--rate and --realtime go with --stream")
    options = {"chunk_seconds": args.chunk_seconds, **_decoding_options(args)}
    model.options(**options)  # a bad option is one error, before any file
    failed = 0
    for path in args.audio:
        try:
            result = model.transcribe(path, **options)
        except AudioError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if args.format == "txt":
            print(result.text if len(args.audio) == 1 else f"{path}\t{result.text}")
        elif args.format == "json":
            print(json.dumps({"audio": str(path), **result.to_dict()}))
        else:
            print(format_subtitles(result.words, args.format))
    if failed:
        sys.exit(1)


def _transcribe_stream(model, args: argparse.Namespace) -> None:
    """`transcribe --stream`: partial and final text as the audio comes, from a file or raw PCM on stdin."""
    import time

    from .audio import read_audio_file

    if len(args.audio) != 1 or args.format not in ("txt", "json"):
        raise OptionsError("--stream takes one audio file, or - for raw PCM on standard input, and --format txt "
                           "or json")
    if args.audio[0] == "-":
        rate = 16_000 if args.rate is None else args.rate
        chunks = _stdin_pcm(rate)
    elif args.rate is not None:
        raise OptionsError(f"--rate is for raw PCM on standard input (-); {args.audio[0]} has its own")
    else:
        data, rate = read_audio_file(args.audio[0])
        step = max(1, rate // 10)
        chunks = (data[i: i + step] for i in range(0, len(data), step))
    streamer = model.stream(rate, **_decoding_options(args))
    tty, started, fed = sys.stdout.isatty(), time.monotonic(), 0
    try:
        for chunk in chunks:
            fed += len(chunk)
            if args.realtime and args.audio[0] != "-":  # the chunk is there once its last sample was played
                time.sleep(max(0.0, started + fed / rate - time.monotonic()))
            _print_stream_events(streamer.feed(chunk), args.format, tty)
    except KeyboardInterrupt:  # Ctrl-C ends the stream (e.g. arecord | asr transcribe --stream -)
        pass
    _print_stream_events(streamer.finish(), args.format, tty)


def _stdin_pcm(rate: int):
    """Standard input as s16le mono PCM, in chunks of up to 100 ms as they arrive."""
    import numpy as np

    rest = b""
    while block := sys.stdin.buffer.read1(max(2, rate // 10 * 2)):
        data = rest + block
        rest = data[len(data) // 2 * 2:]
        yield np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")


def _print_stream_events(events: list, fmt: str, tty: bool) -> None:
    """JSON lines; on a terminal the partial text rewritten in place; else "partial<TAB>text" / "final<TAB>text"."""
    for e in events:
        if fmt == "json":
            print(json.dumps(dataclasses.asdict(e)), flush=True)
        elif tty:
            print(f"\r\033[K{e.text}", end="\n" if e.kind == "final" and e.text else "", flush=True)
        else:
            print(f"{e.kind}\t{e.text}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asr", description="Deep Speech 2-style speech recognition.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="write JSONL manifests for a corpus",
                       description="Write JSON-lines manifests {audio_filepath, duration, text, id}.")
    p.add_argument("corpus", choices=["fsdd", "kaldi", "librispeech"])
    p.add_argument("--data", nargs="+", required=True,
                   help="fsdd: the FSDD folder; kaldi: one or more data folders (text, wav.scp); "
                        "librispeech: one or more split folders (e.g. LibriSpeech/train-clean-100)")
    p.add_argument("--out", required=True, help="folder for the manifests (one NAME.jsonl per folder)")
    p.add_argument("--test-speaker", default="theo", help="fsdd: speaker held out for testing")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=TRAIN_LAUNCHES)
    p.add_argument("--config", help="YAML file with model/data/train sections")
    p.add_argument("--train", required=True, help="training manifest (.jsonl or .csv)")
    p.add_argument("--dev", required=True, help="dev manifest for evaluation and best-model selection")
    p.add_argument("--out", required=True, help="experiment folder; the best model goes to OUT/best")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.lr=5e-4 model.gru_hidden=256")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("average", help="average the weights of a run's last checkpoints",
                       description="Write the mean of several checkpoints' weights (one network) as a model folder, "
                                   "often better than any one of them. A run keeps train.keep_checkpoints of them "
                                   "(default 2); with train.checkpoint_every_steps, set it higher to average more.")
    p.add_argument("folders", nargs="*", help="checkpoint or model folders to average")
    p.add_argument("--run", help="a training run's OUT folder: average its newest --last checkpoints")
    p.add_argument("--last", type=int, default=5, help="with --run: how many checkpoints (default 5)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("word-pieces", help="learn word pieces for a model to emit instead of characters",
                       description="Learn a sentencepiece unigram model of --vocab-size pieces from text; "
                                   "`asr train ... train.tokenizer=OUT` then trains a model that emits them "
                                   "(with train.init_from a character model, all but its output layer).")
    p.add_argument("--text", nargs="+", required=True, help="text files (.txt/.gz, a sentence a line) or .jsonl "
                   "manifests (their text); never dev or test transcripts")
    p.add_argument("--vocab-size", type=int, default=256, help="pieces, the CTC blank included (default 256)")
    p.add_argument("--out", required=True, help="the sentencepiece model file to write")
    p.set_defaults(func=cmd_word_pieces)

    sub.add_parser("demo", help="the web demo (Gradio) on http://127.0.0.1:7860; asr demo --help for its options")

    p = sub.add_parser("evaluate", help="score a model on a manifest (WER/CER)",
                       description="Writes OUT/hypotheses.jsonl and OUT/summary.json.")
    p.add_argument("--model", required=True, help="model folder (e.g. exp/fsdd/best)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", help="folder for hypotheses.jsonl and summary.json")
    _add_inference_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("lm", help="n-gram language models for beam search (KenLM)",
                       description="tools: build KenLM's lmplz/build_binary once (cmake, Boost); build: text -> "
                                   "LM folder; tune: choose lm_weight/word_score on a dev manifest and store "
                                   "them (and the LM) in the model folder.")
    lm_sub = p.add_subparsers(dest="lm_command", required=True)
    q = lm_sub.add_parser("tools", help="build (or find) lmplz and build_binary")
    q.add_argument("--kenlm-source", help="kenlm-*.tar.gz to build from (default: download from PyPI)")
    q = lm_sub.add_parser("build", help="train a word n-gram LM on text files")
    q.add_argument("--text", nargs="+", required=True, help="text files (.txt/.gz, a sentence a line) or .jsonl "
                   "manifests (their text); never dev or test transcripts")
    q.add_argument("--out", required=True, help="LM folder to write")
    q.add_argument("--order", type=int, default=4)
    q.add_argument("--prune", type=int, nargs="*", default=[0, 0, 1], help="lmplz count thresholds per order")
    q.add_argument("--max-vocabulary", type=int, help="keep only this many most frequent words")
    q.add_argument("--kenlm-source", help="kenlm-*.tar.gz to build the tools from (default: download)")
    q.add_argument("--weights", type=int, nargs="+", help="times to repeat each --text (default 1 each): "
                   "weighs a small in-domain text up beside a large general one")
    q.add_argument("--quantize", type=int, metavar="BITS", help="store probabilities and backoffs in BITS bits "
                   "(e.g. 8), pointers compressed: a smaller lm.bin")
    q = lm_sub.add_parser("perplexity", help="an LM's perplexity and out-of-vocabulary rate on text")
    q.add_argument("--lm", required=True, help="LM folder (asr lm build)")
    q.add_argument("--text", nargs="+", required=True, help="text files or .jsonl manifests (their text)")
    q = lm_sub.add_parser("tune", help="grid-search lm_weight, word_score (and blank penalties) on a dev manifest")
    q.add_argument("--model", required=True, help="model folder; gets lm/ and decoder.json")
    q.add_argument("--lm", required=True, help="LM folder (asr lm build)")
    q.add_argument("--manifest", required=True, help="dev manifest")
    q.add_argument("--lm-weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    q.add_argument("--word-scores", type=float, nargs="+", default=[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    q.add_argument("--blank-penalties", type=float, nargs="+",
                   help="blank penalties to try with every alpha and beta (default: 0 and 1)")
    q.add_argument("--beam-size", type=int, default=50, help="hypotheses kept (the search width is chosen, not "
                   "tuned: wider is slower and rarely worse)")
    q.add_argument("--beam-size-token", type=int, default=DecodingOptions.beam_size_token,
                   help="most likely characters tried per frame")
    q.add_argument("--beam-threshold", type=float, default=DecodingOptions.beam_threshold,
                   help="drop hypotheses this far below the best")
    q.add_argument("--device", default="auto")
    q.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_lm)

    p = sub.add_parser("transcribe", help="transcribe audio files",
                       description="Transcribe wav/flac/ogg/opus/mp3 files (any rate, any channels).")
    p.add_argument("audio", nargs="+", help="audio files (with --stream: one, or - for raw PCM on standard input)")
    p.add_argument("--model", help="model folder (default: $ASR_MODEL, else the model shipped with the package)")
    p.add_argument("--format", choices=FORMATS, default="txt")
    p.add_argument("--stream", action="store_true", help="print partial and final text as the audio comes "
                   "(needs a unidirectional model), e.g. arecord -f S16_LE -r 16000 | asr transcribe --stream -")
    p.add_argument("--rate", type=int, help="--stream -: sample rate of the raw s16le mono PCM (default 16000)")
    p.add_argument("--realtime", action="store_true", help="--stream FILE: play the file at real speed")
    _add_inference_arguments(p)
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("export", help="export the network to ONNX for onnxruntime",
                       description="Write the network after the log-mel features as ONNX (dynamic batch and time), "
                                   "atomically, checked against torch. load_model / asr transcribe then use it "
                                   "on the CPU.")
    p.add_argument("model", help="model folder (e.g. exp/fsdd/best)")
    p.add_argument("--out", help="ONNX file to write (default: MODEL/model.onnx)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # the demo has its own options (asr demo --help)
        from .serve.demo import main as demo_main
        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    warnings.showwarning = lambda message, *_, **__: print(f"asr {args.command}: warning: {message}",
                                                            file=sys.stderr)
    try:
        args.func(args)
    except (ASRError, FileNotFoundError) as e:
        print(f"asr {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"asr {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
