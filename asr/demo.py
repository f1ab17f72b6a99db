"""The Gradio web demo: record or upload audio, see the transcript, the words, the spectrogram and the posteriors.

    asr demo --model exp/fsdd/best            # or: python demo/app.py --model ...

Binds to 127.0.0.1 unless --host says otherwise; --share makes a public Gradio link.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE, AudioError, load_audio
from .packaging import default_model_dir
from .transcribe import DEFAULT_MODEL_ENV, ASRModel, TranscribeOptions, load_model

WORD_COLUMNS = ["word", "start (s)", "end (s)", "confidence"]


@dataclass
class DemoLimits:
    max_seconds: float = 120.0  # longer audio is refused
    max_upload_mb: float = 25.0  # bigger uploads are refused by the server
    silence_dbfs: float = -60.0  # audio whose RMS level is below this is called silent


class DemoError(ValueError):
    """Input the demo refuses, with the message shown in the page."""


class ModelCache:
    """Loaded models by path, so that each request doesn't reload the weights."""

    def __init__(self) -> None:
        self._models: dict[str, ASRModel] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> ASRModel:
        path = path.strip()
        if not path:
            raise DemoError(f"No model: give a model folder (for example exp/fsdd/best) or set ${DEFAULT_MODEL_ENV}.")
        key = str(Path(path).expanduser().resolve())
        with self._lock:
            if key not in self._models:
                try:
                    self._models[key] = load_model(key)
                except Exception as e:  # noqa: BLE001 - any failure to load is the user's to see
                    raise DemoError(f"Cannot load the model in {path}: {e}") from None
            return self._models[key]


@dataclass
class Analysis:
    """Everything the page shows for one recording."""
    text: str
    words: list[list]
    log_mel: np.ndarray  # (mels, frames)
    posteriors: np.ndarray  # (vocab, output frames), probabilities
    tokens: list[str]
    duration: float
    seconds: float  # time taken to transcribe

    @property
    def real_time_factor(self) -> float:
        return self.seconds / self.duration


def analyze(model: ASRModel, audio_path: str | None, decoder: str, limits: DemoLimits) -> Analysis:
    """Transcribe one file for the page; DemoError for input the demo refuses."""
    if not audio_path:
        raise DemoError("No audio: record something or upload a file.")
    name = Path(audio_path).name
    try:
        wave = load_audio(audio_path)
    except AudioError as e:
        raise DemoError(f"Cannot use {name}: {e.problem}") from None
    duration = len(wave) / SAMPLE_RATE
    if duration > limits.max_seconds:
        raise DemoError(f"{name} is {duration:.0f} s long; this demo takes up to {limits.max_seconds:.0f} s.")
    rms_db = 10 * np.log10(float(wave.pow(2).mean()) + 1e-20)
    if rms_db < limits.silence_dbfs:
        raise DemoError(f"{name} is silent (level {rms_db:.0f} dBFS): nothing to transcribe.")
    start = time.perf_counter()
    opts = TranscribeOptions(decoder=decoder)
    log_probs = model.posteriors([wave], opts)[0]
    result = model.decode(log_probs, duration, opts)
    seconds = time.perf_counter() - start
    words = [[w.word, w.start, w.end, w.confidence] for w in result.words]
    return Analysis(result.text, words, model.log_mel(wave).numpy(), log_probs.exp().T.numpy(),
                    list(model.vocab.tokens), duration, seconds)


def spectrogram_figure(analysis: Analysis, hop_seconds: float):
    """Log-mel spectrogram with each word's span marked and labelled."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=90)
    frames = analysis.log_mel.shape[1]
    ax.imshow(analysis.log_mel, origin="lower", aspect="auto", cmap="magma",
              extent=(0, frames * hop_seconds, 0, analysis.log_mel.shape[0]))
    top = analysis.log_mel.shape[0]
    for word, start, end, _ in analysis.words:
        ax.axvline(start, color="cyan", lw=1)
        ax.axvline(end, color="cyan", lw=1, ls="--")
        ax.text((start + end) / 2, top * 0.93, word, color="white", ha="center", va="top", fontsize=10,
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "edgecolor": "none"})
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel band")
    ax.set_title("log-mel spectrogram and word boundaries")
    fig.tight_layout()
    return fig


def posteriorgram_figure(analysis: Analysis, frame_seconds: float):
    """CTC posteriors, frame by frame: which character (or blank) the model heard when."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=90)
    probs = analysis.posteriors
    ax.imshow(probs, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
              extent=(0, probs.shape[1] * frame_seconds, -0.5, probs.shape[0] - 0.5))
    labels = ["∅" if i == 0 else ("␣" if t == " " else t) for i, t in enumerate(analysis.tokens)]
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("seconds")
    ax.set_title("CTC posteriorgram (∅ blank, ␣ space)")
    fig.tight_layout()
    return fig


def build_app(default_model: str = "", limits: DemoLimits | None = None, cache: ModelCache | None = None):
    """The Gradio Blocks app; its API endpoint is named "transcribe"."""
    import gradio as gr
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = limits or DemoLimits()
    cache = cache or ModelCache()

    def decoder_choices(model_path: str) -> list[tuple[str, str]]:
        """(label, decoder) pairs: beam search is labelled "beam + LM" when the model has a language model."""
        try:
            model = cache.get(model_path)
        except DemoError:
            return [("greedy", "greedy")]
        return [("beam + LM" if d == "beam" and model.lm is not None else d, d) for d in model.decoders]

    def run(audio_path, decoder, model_path):
        try:
            model = cache.get(model_path)
            analysis = analyze(model, audio_path, decoder, limits)
        except DemoError as e:
            raise gr.Error(str(e), duration=None) from None
        hop = model.model.config.features.hop_length / SAMPLE_RATE
        spec = spectrogram_figure(analysis, hop)
        post = posteriorgram_figure(analysis, model.frame_seconds)
        timing = (f"{analysis.duration:.2f} s of audio transcribed in {analysis.seconds * 1000:.0f} ms "
                  f"(real-time factor {analysis.real_time_factor:.3f}) on {model.device.type}")
        plt.close(spec)
        plt.close(post)
        return analysis.text, analysis.words, spec, post, timing

    with gr.Blocks(title="asr demo") as app:
        gr.Markdown("# Speech recognition demo\nRecord or upload audio; the model writes what it heard, "
                    "with word timings, the spectrogram and its frame-by-frame posteriors.")
        with gr.Row():
            with gr.Column():
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="audio")
                decoder = gr.Radio(decoder_choices(default_model), value="greedy", label="decoder")
                model_path = gr.Textbox(default_model, label="model folder")
                button = gr.Button("Transcribe", variant="primary")
            with gr.Column():
                text = gr.Textbox(label="transcript", elem_id="transcript", interactive=False)
                words = gr.Dataframe(headers=WORD_COLUMNS, label="words", interactive=False)
                timing = gr.Markdown(elem_id="timing")
        spectrogram = gr.Plot(label="spectrogram")
        posteriorgram = gr.Plot(label="posteriorgram")
        model_path.change(lambda p: gr.Radio(choices=decoder_choices(p), value="greedy"), model_path, decoder)
        button.click(run, [audio, decoder, model_path], [text, words, spectrogram, posteriorgram, timing],
                     api_name="transcribe")
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="asr demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get(DEFAULT_MODEL_ENV) or str(default_model_dir() or ""),
                        help=f"model folder (default: ${DEFAULT_MODEL_ENV}, else the model shipped with the package)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--max-seconds", type=float, default=DemoLimits.max_seconds, help="longest audio accepted")
    parser.add_argument("--max-upload-mb", type=float, default=DemoLimits.max_upload_mb, help="largest upload")
    parser.add_argument("--concurrency", type=int, default=1, help="requests transcribed at once (others queue)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    app = build_app(args.model, DemoLimits(args.max_seconds, args.max_upload_mb))
    app.queue(default_concurrency_limit=args.concurrency, max_size=256)
    app.launch(server_name=args.host, server_port=args.port, share=args.share,
               max_file_size=int(args.max_upload_mb * 2 ** 20), show_error=True)


if __name__ == "__main__":
    main()
