"""The Gradio web demo: record or upload audio, see the transcript, the words, the spectrogram and the posteriors;
or speak into the microphone (the Live tab) and see the text as it is spoken, with its latency.

    asr demo --model exp/fsdd/best            # or: python demo/app.py --model ...
    asr demo --model exp/fsdd/best --model exp/libri/best   # offer two; the first is the default

The Live tab needs a streaming (unidirectional) model; it says so for the others. The page (and its API) offers
only the --model folders. Binds to 127.0.0.1 unless --host says
otherwise; --share makes a public Gradio link.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ..audio import SAMPLE_RATE, AudioError, load_audio
from ..decoding import DECODERS
from ..errors import ASRError
from .packaging import default_model_dir
from .streaming import Streamer, StreamEvent
from .transcribe import DEFAULT_MODEL_ENV, ASRModel, load_model

WORD_COLUMNS = ["word", "start (s)", "end (s)", "confidence"]


@dataclass
class DemoLimits:
    max_seconds: float = 120.0  # longer audio is refused
    max_upload_mb: float = 25.0  # bigger uploads are refused by the server
    silence_dbfs: float = -60.0  # audio whose RMS level is below this is called silent
    max_decoded_mb: float = 256.0  # audio whose samples (all channels, float32) take more is refused
    live_sessions: int = 4  # microphone streams transcribed at once (the Live tab; others wait)


class DemoError(ASRError, ValueError):
    """Input the demo refuses, with the message shown in the page."""


NOT_OFFERED = "That model is not one of the models this demo offers; choose one from the model list."


class ModelChoices:
    """The models the demo offers (given by its operator; the first is the default), each loaded once.

    A request names one of them, or nothing for the default; any other name is refused with the same
    message whether or not such a path exists, and is never looked up on disk.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(dict.fromkeys(p.strip() for p in paths if p.strip()))
        if not self.paths:
            raise DemoError(f"No model: pass --model FOLDER or set ${DEFAULT_MODEL_ENV}.")
        self._models: dict[str, ASRModel] = {}
        self._lock = threading.Lock()

    @property
    def default(self) -> str:
        return self.paths[0]

    def get(self, path: str | None) -> ASRModel:
        """The offered model `path` names (the default when empty), loaded on first use."""
        path = (path or "").strip() or self.default
        if path not in self.paths:
            raise DemoError(NOT_OFFERED)
        with self._lock:
            if path not in self._models:
                try:
                    model = load_model(path)
                    model.decoder()  # its own decoder built now (a beam search's lexicon: ~1 s), not in a request
                except Exception as e:  # noqa: BLE001 - the operator's own folder: say what is wrong
                    raise DemoError(f"Cannot load the model in {path}: {e}") from None
                self._models[path] = model
            return self._models[path]

    def load_all(self) -> None:
        """Load every offered model now, so that a bad folder stops the demo at its start."""
        for path in self.paths:
            self.get(path)


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


def check_duration(name: str, seconds: float, limits: DemoLimits) -> None:
    """Refuse audio longer than the demo takes."""
    if seconds > limits.max_seconds:
        raise DemoError(f"{name} is {seconds:.0f} s long; this demo takes up to {limits.max_seconds:.0f} s.")


def check_header(audio_path: str, limits: DemoLimits) -> None:
    """Refuse audio too long or too big to decode from what its header says (a no-op without a header)."""
    name = Path(audio_path).name
    try:
        info = sf.info(audio_path)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return  # not a format libsndfile knows: decoding will tell
    if info.frames <= 0 or info.samplerate <= 0:
        return  # the header states no length
    check_duration(name, info.frames / info.samplerate, limits)
    decoded_mb = info.frames * info.channels * 4 / 2 ** 20
    if decoded_mb > limits.max_decoded_mb:
        raise DemoError(f"{name} would take {decoded_mb:.0f} MB to decode ({info.channels} channels at "
                        f"{info.samplerate} Hz); this demo takes up to {limits.max_decoded_mb:.0f} MB.")


def checked_wave(audio_path: str | None, limits: DemoLimits) -> torch.Tensor:
    """The 16 kHz waveform of an upload the demo accepts; DemoError (naming the file) for one it refuses.

    Length and size are checked from the header before the file is decoded, so that a small upload
    that decodes to hours of audio costs nothing.
    """
    if not audio_path:
        raise DemoError("No audio: record something or upload a file.")
    name = Path(audio_path).name
    check_header(audio_path, limits)
    try:
        wave = load_audio(audio_path)
    except AudioError as e:
        raise DemoError(f"Cannot use {name}: {e.problem}") from None
    check_duration(name, len(wave) / SAMPLE_RATE, limits)
    rms_db = 10 * np.log10(float(wave.pow(2).mean()) + 1e-20)
    if rms_db < limits.silence_dbfs:
        raise DemoError(f"{name} is silent (level {rms_db:.0f} dBFS): nothing to transcribe.")
    return wave


def analyze(model: ASRModel, audio_path: str | None, decoder: str, limits: DemoLimits) -> Analysis:
    """Transcribe one file for the page, as `model.transcribe` would; DemoError for input the demo refuses."""
    wave = checked_wave(audio_path, limits)
    duration = len(wave) / SAMPLE_RATE
    start = time.perf_counter()
    log_probs = model.posteriors([wave])[0]
    result = model.decode(log_probs, duration, wave, decoder=decoder)
    seconds = time.perf_counter() - start
    words = [[w.word, w.start, w.end, w.confidence] for w in result.words]
    heard = log_probs[:, model.columns(decoder)]  # the output layer this decoder read (see ASRModel.columns)
    return Analysis(result.text, words, model.log_mel(wave).numpy(), heard.exp().T.numpy(),
                    list(model.vocabulary(decoder).tokens), duration, seconds)


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


POSTERIORGRAM_ROWS = 40  # a word-piece model's posteriorgram shows the blank and the tokens heard most


def shown_tokens(posteriors: np.ndarray) -> list[int]:
    """The rows (token indices) of a (vocab, frames) posteriorgram to draw: all of a character vocabulary; of a
    larger one the blank and the POSTERIORGRAM_ROWS - 1 tokens with the highest peak probability, in vocabulary
    order."""
    if len(posteriors) <= POSTERIORGRAM_ROWS:
        return list(range(len(posteriors)))
    peaks = posteriors[1:].max(axis=1) if posteriors.shape[1] else np.zeros(len(posteriors) - 1)
    return [0] + sorted(int(i) + 1 for i in np.argsort(-peaks, kind="stable")[: POSTERIORGRAM_ROWS - 1])


def posteriorgram_figure(analysis: Analysis, frame_seconds: float):
    """CTC posteriors, frame by frame: which character (or blank) the model heard when."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=90)
    rows = shown_tokens(analysis.posteriors)
    probs = analysis.posteriors[rows]
    ax.imshow(probs, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
              extent=(0, probs.shape[1] * frame_seconds, -0.5, probs.shape[0] - 0.5))
    labels = ["∅" if i == 0 else ("␣" if analysis.tokens[i] == " " else analysis.tokens[i]) for i in rows]
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("seconds")
    most = f"; the {len(rows) - 1} tokens heard most" if len(rows) < len(analysis.tokens) else ""
    ax.set_title(f"CTC posteriorgram (∅ blank, ␣ space{most})")
    fig.tight_layout()
    return fig


LIVE_CHUNK_SECONDS = 0.25  # microphone audio the page sends at a time (the Live tab)


@dataclass
class LiveSession:
    """One page's live transcription: the stream of its recording (begun by the first chunk), the text so far, and
    the line shown under it (the last update's latency, or why there is no text)."""

    streamer: Streamer | None = None
    key: tuple[str, str, int] | None = None  # the stream's (model, decoder, sample rate)
    finals: list[str] = field(default_factory=list)  # the finished segments
    partial: str = ""  # the segment being spoken
    info: str = ""
    stopped: bool = False  # the recording ended: chunks still on their way are dropped
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def text(self) -> str:
        """Each finished segment on a line of its own, then the one being spoken."""
        return "\n".join(self.finals + ([self.partial] if self.partial else []))

    def show(self, events: list[StreamEvent]) -> None:
        for event in events:
            if event.kind == "final":
                self.finals += [event.text] if event.text else []
                self.partial = ""
            else:
                self.partial = event.text

    def finish(self) -> None:
        """End the stream, if one is running: its last segment becomes final."""
        if self.streamer is not None:
            self.show(self.streamer.finish())
            self.streamer = self.key = None


def live_unavailable(model_path: str, problem: Exception) -> str:
    return (f"Live transcription is not available with {model_path}: {problem}. "
            f"The Upload tab transcribes with any model.")


def live_status(models: ModelChoices, model_path: str) -> str:
    """What the Live tab says before recording: ready, or why this model cannot stream."""
    try:
        models.get(model_path).stream(SAMPLE_RATE, decoder="greedy")
    except ASRError as e:
        return live_unavailable(model_path, e)
    return "Ready: press Record and speak; the text appears as you talk."


def live_start(session: LiveSession | None) -> LiveSession:
    """A new recording: a new transcript. (A page's session is None until its first event.)"""
    session = session or LiveSession()
    with session.lock:
        session.streamer = session.key = None
        session.finals, session.partial, session.info, session.stopped = [], "", "Listening…", False
    return session


def live_stop(session: LiveSession | None) -> LiveSession:
    """The recording stopped (or was cleared): what is still being spoken becomes final."""
    session = session or LiveSession()
    with session.lock:
        session.finish()
        session.stopped = True
    return session


def live_chunk(session: LiveSession | None, chunk: tuple[int, np.ndarray] | None, models: ModelChoices, model_path: str,
               decoder: str, limits: DemoLimits) -> LiveSession:
    """Feed one chunk of microphone audio, (sample rate, samples), to the session's stream; update its text and
    the latency line: time from the chunk's arrival to its text, and how much of the audio heard the text covers
    (the rest waits for the model's lookahead). A model that cannot stream is said in that line."""
    arrived = time.perf_counter()
    session = session or LiveSession()
    with session.lock:
        if chunk is None or session.stopped:
            return session
        rate, samples = chunk
        key = (model_path, decoder, int(rate))
        if session.key != key:  # another model or decoder chosen (or rate): the next segment uses it
            session.finish()
        try:
            if session.streamer is None:
                session.streamer = models.get(model_path).stream(int(rate), decoder=decoder)
                session.key = key
            session.show(session.streamer.feed(samples))
        except ASRError as e:
            problem = live_unavailable(model_path, e) if session.streamer is None else f"Cannot use that audio: {e}"
            session.info = problem
            return session
        streamer = session.streamer
        heard = streamer.duration
        covered = min(heard, streamer.frames * streamer.frame_seconds)
        seconds = time.perf_counter() - arrived
        session.info = (f"Latency of the last update: {seconds * 1000:.0f} ms from the chunk's arrival to its text "
                        f"({len(samples) / rate:.2f} s chunk); the text covers {covered:.2f} s of the {heard:.2f} s "
                        f"heard ({heard - covered:.2f} s behind).")
        if heard >= limits.max_seconds:
            session.finish()
            session.stopped = True
            session.info += f" Stopped at {limits.max_seconds:g} s, the longest this demo takes."
    return session


def build_app(models: ModelChoices, limits: DemoLimits | None = None):
    """The Gradio Blocks app over the offered `models`; its API endpoint is named "transcribe"."""
    import gradio as gr
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = limits or DemoLimits()

    def decoder_radio(model_path: str) -> gr.Radio:
        """The model's decoders (beam search labelled "beam + LM" when it has a language model), set to the one it
        uses when none is asked for (its decoder.json's); greedy alone when the model cannot load."""
        try:
            model = models.get(model_path)
        except DemoError:
            return gr.Radio(choices=[("greedy", "greedy")], value="greedy", label="decoder")
        choices = [("beam + LM" if d == "beam" and model.lm is not None else d, d) for d in DECODERS]
        return gr.Radio(choices=choices, value=model.decoding.decoder, label="decoder")

    def run(audio_path, decoder, model_path):
        try:
            model = models.get(model_path)
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
        with gr.Tab("Upload"):
            with gr.Row():
                with gr.Column():
                    audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="audio")
                    decoder = decoder_radio(models.default)
                    # custom values pass the dropdown so that the API's "" (the default) and names not
                    # offered get this app's own answers (ModelChoices.get)
                    model_path = gr.Dropdown(models.paths, value=models.default, label="model",
                                             allow_custom_value=True)
                    button = gr.Button("Transcribe", variant="primary")
                with gr.Column():
                    text = gr.Textbox(label="transcript", elem_id="transcript", interactive=False)
                    words = gr.Dataframe(headers=WORD_COLUMNS, label="words", interactive=False)
                    timing = gr.Markdown(elem_id="timing")
            spectrogram = gr.Plot(label="spectrogram")
            posteriorgram = gr.Plot(label="posteriorgram")
        with gr.Tab("Live"):
            gr.Markdown("Speak into the microphone: the text appears as you talk, a line for each finished phrase "
                        "(the last line may still change). Needs a streaming (unidirectional) model.")
            with gr.Row():
                with gr.Column():
                    live_audio = gr.Audio(sources=["microphone"], streaming=True, type="numpy", label="microphone",
                                          elem_id="live-audio")
                    live_decoder = decoder_radio(models.default)
                    live_model = gr.Dropdown(models.paths, value=models.default, label="model", elem_id="live-model")
                with gr.Column():
                    live_text = gr.Textbox(label="live transcript", elem_id="live-transcript", lines=4,
                                           interactive=False)
                    live_info = gr.Markdown(live_status(models, models.default), elem_id="live-info")
            session = gr.State(None)  # a LiveSession from the page's first event on
        model_path.change(decoder_radio, model_path, decoder)
        button.click(run, [audio, decoder, model_path], [text, words, spectrogram, posteriorgram, timing],
                     api_name="transcribe")

        shown = [session, live_text, live_info]
        quick = {"show_progress": "hidden", "concurrency_limit": None, "api_visibility": "private"}

        def show(s: LiveSession):
            return s, s.text, s.info

        live_model.change(lambda p: (decoder_radio(p), live_status(models, p)), live_model, [live_decoder, live_info],
                          **quick)
        live_audio.start_recording(lambda s: show(live_start(s)), session, shown, **quick)
        live_audio.stop_recording(lambda s: show(live_stop(s)), session, shown, **quick)
        live_audio.clear(lambda s: show(live_stop(s)), session, shown, **quick)
        live_audio.stream(lambda s, chunk, d, p: show(live_chunk(s, chunk, models, p, d, limits)),
                          [session, live_audio, live_decoder, live_model], shown, stream_every=LIVE_CHUNK_SECONDS,
                          time_limit=math.ceil(limits.max_seconds) + 30,  # a backstop: live_chunk stops at max_seconds
                          concurrency_limit=limits.live_sessions, show_progress="hidden", api_visibility="private")
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="asr demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[],
                        help=f"a model folder to offer; repeat to offer several, the first is the default "
                             f"(default: ${DEFAULT_MODEL_ENV}, else the model shipped with the package)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--max-seconds", type=float, default=DemoLimits.max_seconds, help="longest audio accepted")
    parser.add_argument("--max-upload-mb", type=float, default=DemoLimits.max_upload_mb, help="largest upload")
    parser.add_argument("--concurrency", type=int, default=1, help="requests transcribed at once (others queue)")
    parser.add_argument("--live-sessions", type=int, default=DemoLimits.live_sessions,
                        help="microphone streams transcribed at once in the Live tab (others wait)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    default = os.environ.get(DEFAULT_MODEL_ENV) or str(default_model_dir() or "")
    try:
        models = ModelChoices(args.model or [default])
        models.load_all()
    except DemoError as e:
        parser.exit(2, f"asr demo: error: {e}\n")
    app = build_app(models, DemoLimits(args.max_seconds, args.max_upload_mb, live_sessions=args.live_sessions))
    app.queue(default_concurrency_limit=args.concurrency, max_size=256)
    app.launch(server_name=args.host, server_port=args.port, share=args.share,
               max_file_size=int(args.max_upload_mb * 2 ** 20), show_error=True)


if __name__ == "__main__":
    main()
