"""Synthetic training speech from text-to-speech engines: many voices, random speed and pitch.

Engines, each used only when installed (recipes/synthetic/install.sh installs them all), with what a job's
speed and pitch (SynthesisJob.speed, .pitch) drive:

- `espeak-ng`: English accents x voice variants; speed x 165 words per minute, pitch 0-99 (50 normal);
- `flite`: its built-in voices; duration_stretch 1/speed, pitch the mean F0 in Hz;
- `mbrola`: espeak-ng's English mbrola voices (mb-us1, ...; Debian contrib), driven as espeak-ng;
- `festival`: its English voices through text2wave; the voice's Duration_Stretch over speed (HTS voices:
  -r speed), pitch a factor on the voice's own F0 (1 = unchanged; HTS voices have no pitch control);
- `pico`: pico2wave's en-US and en-GB (Debian non-free); <speed> and <pitch> markup, pitch a factor;
- `piper`: neural voices of installed `*piper_voice*` packages (or folders in $ASR_PIPER_VOICES), run
  offline in-process; length_scale 1/speed, fixed pitch, SynthesisJob.noise its noise_scale.

Generation is parallel, deterministic for a seed (each file's settings derive from the seed and its own key,
not from the order of work; piper's generator noise is seeded per file too) and resumable (files already
written are kept).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pkgutil
import random
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from xml.sax.saxutils import escape

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from ..errors import ASRError
from ..files import replaced_atomically
from ..manifest import Utterance, write_manifest

ENGINES = ("espeak-ng", "flite", "mbrola", "festival", "pico", "piper")
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp", "en-029")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
                   "klatt3", "klatt4", "croak", "adam", "Alex", "Andy", "annie", "benjamin", "david", "ed", "john",
                   "linda", "max", "Mike", "paul", "quincy", "rob", "robert", "steph", "travis", "victor", "zac")
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
MBROLA_DIR = Path("/usr/share/mbrola")
FESTIVAL_VOICE_DIRS = (Path("/usr/share/festival/voices/english"), Path("/usr/share/festival/voices/us"))
PICO_VOICES = ("en-US", "en-GB")
PIPER_NOISE_TABLE = 1 << 18  # seeded normal values that piper's noise is drawn from (wraps after ~15 s of audio)
# what mbrola prints when it stops at a diphone it cannot join; festival and espeak-ng then exit 0 with the audio so far
MBROLA_FATAL = "Fatal error"

log = logging.getLogger(__name__)


class SynthesisError(ASRError, RuntimeError):
    """A text-to-speech engine is missing or failed; the message says which and how to install it."""


class UnsayableText(SynthesisError):
    """The engine works but stopped part-way through this text: its audio would not match the transcript."""


@dataclass(frozen=True)
class Voice:
    engine: str  # one of ENGINES
    name: str  # espeak-ng: "accent+variant"; mbrola: "mb-us1"; piper: model stem [+ "+speaker id"]

    @property
    def id(self) -> str:
        return f"{self.engine}_{self.name}".replace("+", "_").replace("-", "")


def available_voices(engines: Sequence[str] = ENGINES) -> list[Voice]:
    """Every voice of the given engines that is installed here (an engine that is missing gives none)."""
    voices = []
    if "espeak-ng" in engines and shutil.which("espeak-ng"):
        voices += [Voice("espeak-ng", f"{a}+{v}") for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS]
    if "flite" in engines and shutil.which("flite"):
        listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout
        voices += [Voice("flite", v) for v in FLITE_VOICES if v in listed.split()]
    if "mbrola" in engines:
        voices += [Voice("mbrola", v) for v in _mbrola_voices()]
    if "festival" in engines and shutil.which("text2wave"):
        voices += [Voice("festival", d.name) for folder in FESTIVAL_VOICE_DIRS if folder.is_dir()
                   for d in sorted(folder.iterdir()) if (d / "festvox").is_dir()]
    if "pico" in engines and shutil.which("pico2wave"):
        voices += [Voice("pico", v) for v in PICO_VOICES]
    if "piper" in engines and importlib.util.find_spec("piper") and importlib.util.find_spec("onnx"):
        for stem, model in _piper_models().items():
            speakers = json.loads(Path(f"{model}.json").read_text()).get("num_speakers", 1)
            names = [stem] if speakers <= 1 else [f"{stem}+{s}" for s in range(speakers)]
            voices += [Voice("piper", n) for n in names]
    return voices


def _mbrola_voices() -> list[str]:
    """espeak-ng's English mbrola voices whose mbrola database is installed (needs espeak-ng and mbrola)."""
    if not (shutil.which("espeak-ng") and shutil.which("mbrola")):
        return []
    listed = subprocess.run(["espeak-ng", "--voices=mb"], capture_output=True, text=True).stdout.splitlines()[1:]
    names = [f[4].split("/")[-1] for f in (line.split() for line in listed) if len(f) >= 5 and f[1].startswith("en")]
    return sorted(n for n in names if _mbrola_database(n.split("-")[1]))


def _mbrola_database(name: str) -> bool:
    return any(p.is_file() for p in (MBROLA_DIR / name, MBROLA_DIR / name / name, MBROLA_DIR / "voices" / name))


def _piper_models() -> dict[str, Path]:
    """Piper models (.onnx beside its .onnx.json) by stem: in installed packages named *piper_voice*, then in
    the folders of $ASR_PIPER_VOICES (os.pathsep-separated)."""
    folders = [Path(m.module_finder.path) / m.name for m in pkgutil.iter_modules()
               if "piper_voice" in m.name and m.ispkg and hasattr(m.module_finder, "path")]
    folders += [Path(f) for f in os.environ.get("ASR_PIPER_VOICES", "").split(os.pathsep) if f]
    models = {}
    for folder in folders:
        for model in sorted(folder.rglob("*.onnx")) if folder.is_dir() else []:
            if Path(f"{model}.json").is_file():
                models.setdefault(model.stem, model)
    return models


def require_engines(voices: Sequence[Voice]) -> None:
    if not voices:
        raise SynthesisError("no text-to-speech engine found: install Debian's espeak-ng and flite "
                             "(apt-get install espeak-ng flite; recipes/synthetic/install.sh installs every engine)")


@dataclass(frozen=True)
class SynthesisJob:
    key: str  # file name stem, unique
    text: str
    voice: Voice
    speed: float  # 1.0 = the engine's normal rate
    pitch: float  # espeak-ng, mbrola: 0-99 (50 normal); flite: mean F0 in Hz; festival, pico: factor (1 normal)
    noise: float = 0.0  # piper: its noise_scale (variety of delivery); other engines: unused


def _rng_for(seed: int, key: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16))


def _fixed_pitch(voice: Voice) -> bool:
    """Voices without pitch control: piper's, and festival's HTS voices (festival passes only -r to HTS)."""
    return voice.engine == "piper" or (voice.engine == "festival" and voice.name.endswith("_hts"))


def plan_jobs(texts: Sequence[str], voices: Sequence[Voice], copies: int = 1, seed: int = 0,
              speed: tuple[float, float] = (0.8, 1.25), prefix: str = "syn") -> list[SynthesisJob]:
    """Every text in every voice, `copies` times, each with its own random speed, pitch (and piper noise)."""
    jobs = []
    for t, text in enumerate(texts):
        for voice in voices:
            for c in range(copies):
                key = f"{prefix}{t:06d}_{voice.id}_{c}"
                rng = _rng_for(seed, key)  # draws pitch, speed, noise in this order (keeps older plans unchanged)
                if voice.engine in ("espeak-ng", "mbrola"):
                    pitch = round(rng.uniform(30, 75), 1)
                elif voice.engine == "flite":
                    pitch = round(rng.uniform(85, 140) if voice.name != "slt" else rng.uniform(160, 230), 1)
                else:
                    pitch = 1.0 if _fixed_pitch(voice) else round(rng.uniform(0.85, 1.2), 3)
                job_speed = round(rng.uniform(*speed), 3)
                noise = round(rng.uniform(0.4, 0.9), 3) if voice.engine == "piper" else 0.0
                jobs.append(SynthesisJob(key, text, voice, job_speed, pitch, noise))
    return jobs


def _festival_setup(job: SynthesisJob) -> str:
    """Scheme run after the voice is selected: its own duration stretch and F0 scaled by the job's."""
    return (f"(begin (let ((d (Parameter.get 'Duration_Stretch))) "
            f"(Parameter.set 'Duration_Stretch (/ (if d d 1.0) {job.speed}))) "
            f"(if (symbol-bound? 'hts_engine_params) "
            f"(set! hts_engine_params (cons (list \"-r\" {job.speed}) hts_engine_params))) "
            f"(if (symbol-bound? 'int_lr_params) (set! int_lr_params (mapcar (lambda (p) "
            f"(if (member (car p) '(target_f0_mean target_f0_std)) (list (car p) (* {job.pitch} (cadr p))) p)) "
            f"int_lr_params))))")


def _engine_command(job: SynthesisJob, wav: Path) -> tuple[list[str], str | None]:
    """The command line that writes the job's audio to `wav`, and the text to pass on its standard input."""
    engine, name = job.voice.engine, job.voice.name
    if engine in ("espeak-ng", "mbrola"):
        return ["espeak-ng", "-v", name, "-s", str(int(round(165 * job.speed))), "-p",
                str(int(round(job.pitch))), "-w", str(wav), job.text], None
    if engine == "flite":
        return ["flite", "-voice", name, "--setf", f"duration_stretch={1 / job.speed:.3f}",
                "--setf", f"int_f0_target_mean={job.pitch}", "-t", job.text, "-o", str(wav)], None
    if engine == "festival":
        return ["text2wave", "-eval", f"(voice_{name})", "-eval", _festival_setup(job), "-o", str(wav)], job.text
    if engine == "pico":
        marked = (f"<speed level='{int(round(100 * job.speed))}'><pitch level='{int(round(100 * job.pitch))}'>"
                  f"{escape(job.text)}</pitch></speed>")
        return ["pico2wave", "-l", name, "-w", str(wav), marked], None
    raise SynthesisError(f"unknown engine {engine!r} for {job.key}")


def _run_engine(job: SynthesisJob, tmp: Path) -> tuple[np.ndarray, int]:
    """The engine's mono audio for one job and its sample rate."""
    if job.voice.engine == "piper":
        return _piper_audio(job)
    wav = tmp / "out.wav"
    command, stdin = _engine_command(job, wav)
    failed = f"{job.voice.engine} failed for {job.key} ({job.text!r})"
    try:
        proc = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SynthesisError(f"{failed}: {e}") from e
    if proc.returncode != 0 or not wav.exists() or "SIOD ERROR" in proc.stderr:  # festival exits 0 on errors
        raise SynthesisError(f"{failed}: {proc.stderr.strip()[:300]}")
    if MBROLA_FATAL in proc.stderr:
        raise UnsayableText(f"{failed}: it stopped part-way: {proc.stderr.strip()[:300]}")
    wave, rate = sf.read(wav, dtype="float32", always_2d=True)
    return wave.mean(1), rate


_piper_cache: dict[Path, Any] = {}  # loaded voices by model path
_piper_paths: dict[str, Path] = {}  # their paths by stem
_piper_lock = threading.Lock()


def _piper_voice(model: Path) -> Any:
    """A piper voice, loaded once per process, its random nodes replaced by lookups in a fed noise table."""
    with _piper_lock:
        if model not in _piper_cache:
            import onnxruntime
            from piper import PiperVoice
            from piper.config import PiperConfig

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1  # build_corpus runs one job per core
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(_seeded_noise_model(model), sess_options=options,
                                                   providers=["CPUExecutionProvider"])
            config = PiperConfig.from_dict(json.loads(Path(f"{model}.json").read_text()))
            _piper_cache[model] = PiperVoice(session=session, config=config)
            _piper_paths[model.stem] = model
        return _piper_cache[model]


def _seeded_noise_model(model: Path) -> bytes:
    """The ONNX model with each RandomNormalLike node turned into a lookup in a new input, `noise_table`.

    onnxruntime's random nodes draw from one generator per session, so a text would come out differently on
    each call; a table drawn from a per-file seed makes piper's output reproducible.
    """
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(model))
    graph = proto.graph
    nodes, found = [], 0
    for node in graph.node:
        if node.op_type != "RandomNormalLike":
            nodes.append(node)
            continue
        if any(a.name in ("mean", "scale") for a in node.attribute):
            raise SynthesisError(f"piper model {model}: RandomNormalLike with mean/scale is not supported")
        p = f"/seeded_noise{found}/"
        nodes += [_onnx_int(p + "start", found * 104_729 % PIPER_NOISE_TABLE), _onnx_int(p + "step", 1),
                  _onnx_int(p + "size", PIPER_NOISE_TABLE), helper.make_node("Shape", [node.input[0]], [p + "shape"]),
                  helper.make_node("ReduceProd", [p + "shape"], [p + "count"], keepdims=0),
                  helper.make_node("Add", [p + "count", p + "start"], [p + "stop"]),
                  helper.make_node("Range", [p + "start", p + "stop", p + "step"], [p + "range"]),
                  helper.make_node("Mod", [p + "range", p + "size"], [p + "index"]),
                  helper.make_node("Gather", ["noise_table", p + "index"], [p + "flat"], axis=0),
                  helper.make_node("Reshape", [p + "flat", p + "shape"], [node.output[0]])]
        found += 1
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info("noise_table", TensorProto.FLOAT, [PIPER_NOISE_TABLE]))
    return proto.SerializeToString()


def _onnx_int(name: str, value: int) -> Any:
    """An ONNX node that outputs the int64 scalar `value` as `name`."""
    from onnx import TensorProto, helper

    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [], [value]))


def _piper_audio(job: SynthesisJob) -> tuple[np.ndarray, int]:
    """Piper's audio for one job: length_scale from its speed, noise_scale its noise, noise seeded by its key."""
    stem, _, speaker = job.voice.name.partition("+")
    failed = f"piper failed for {job.key} ({job.text!r})"
    model = _piper_paths.get(stem) or _piper_models().get(stem)
    if model is None:
        raise SynthesisError(f"{failed}: no piper model {stem!r} (recipes/synthetic/install.sh installs one)")
    try:
        voice = _piper_voice(model)
        rng = np.random.default_rng(int(hashlib.sha256(f"{job.key}:{job.noise}".encode()).hexdigest()[:16], 16))
        scales = np.array([job.noise, voice.config.length_scale / job.speed, voice.config.noise_w_scale], np.float32)
        pieces = []
        for phonemes in voice.phonemize(job.text):  # one run per sentence, as piper does
            ids = voice.phonemes_to_ids(phonemes)
            feeds = {"input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64),
                     "scales": scales, "noise_table": rng.standard_normal(PIPER_NOISE_TABLE, np.float32)}
            if voice.config.num_speakers > 1:
                feeds["sid"] = np.array([int(speaker or 0)], np.int64)
            pieces.append(voice.session.run(None, feeds)[0].reshape(-1))
    except SynthesisError:
        raise
    except Exception as e:  # onnxruntime, piper and onnx raise many types
        raise SynthesisError(f"{failed}: {type(e).__name__}: {e}") from e
    if not pieces:
        raise SynthesisError(f"{failed}: no phonemes")
    return np.concatenate(pieces).astype(np.float32), voice.config.sample_rate


def trim_silence(wave: np.ndarray, sample_rate: int, threshold_db: float = -40.0, margin: float = 0.05
                 ) -> np.ndarray:
    """Cut leading and trailing stretches quieter than threshold_db below the peak (10 ms frames)."""
    frame = max(1, sample_rate // 100)
    n = len(wave) // frame
    if n == 0:
        return wave
    energy = (wave[: n * frame].reshape(n, frame) ** 2).mean(1)
    loud = np.nonzero(10 * np.log10(energy + 1e-12) > 10 * np.log10(energy.max() + 1e-12) + threshold_db)[0]
    if len(loud) == 0:
        return wave
    pad = int(margin * sample_rate)
    return wave[max(0, loud[0] * frame - pad): min(len(wave), (loud[-1] + 1) * frame + pad)]


def synthesize(job: SynthesisJob, out_dir: Path, sample_rate: int = 16_000) -> Utterance:
    """Run the engine for one job (unless its file exists) and return its manifest entry."""
    path = out_dir / f"{job.key}.flac"
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            wave, rate = _run_engine(job, Path(tmp))
        wave = trim_silence(wave, rate)
        if rate != sample_rate:
            wave = AF.resample(torch.from_numpy(wave), rate, sample_rate).numpy()
        wave = wave / max(1e-4, float(np.abs(wave).max())) * 0.5
        with replaced_atomically(path) as (tmp_path,):  # a killed run leaves no half-written file under the name
            sf.write(tmp_path, wave, sample_rate, format="FLAC")
    duration = sf.info(path).duration
    return Utterance(str(path), duration, job.text, job.key)


def build_corpus(jobs: Sequence[SynthesisJob], out_dir: str | os.PathLike, manifest: str | os.PathLike,
                 sample_rate: int = 16_000, workers: int | None = None, progress: bool = True,
                 description: str = "synthesising") -> list[Utterance]:
    """Synthesise every job into out_dir (in parallel, skipping files already there) and write the manifest.

    A job whose text its engine cannot say to the end (UnsayableText) is left out, with a warning; any other
    failure stops the build, keeping the files already written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1

    def one(job: SynthesisJob) -> Utterance | None:
        try:
            return synthesize(job, out, sample_rate)
        except UnsayableText as e:
            log.warning("%s; left out", e)
            return None

    with ThreadPoolExecutor(workers) as pool:  # the engines are separate processes: threads suffice
        results = list(tqdm(pool.map(one, jobs), total=len(jobs), desc=description, disable=not progress))
    utterances = [u for u in results if u is not None]
    if len(utterances) < len(jobs):
        log.warning("%s: %d of %d texts left out, their engine could not say them to the end", manifest,
                    len(jobs) - len(utterances), len(jobs))
    write_manifest(utterances, manifest)
    return utterances
