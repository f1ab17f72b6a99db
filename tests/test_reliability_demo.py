"""The web demo under bad input and load: long audio refused from its header, only the offered models,
a parallel burst, an oversized upload and non-audio uploads, against a real server on 127.0.0.1."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

import asr.serve.demo
from asr.serve.demo import DemoError, DemoLimits, analyze
from asr.serve.transcribe import load_model

from .conftest import TEXTS, served_demo, write_tone_files

gradio_client = pytest.importorskip("gradio_client", reason="the demo tests need the dev extra (gradio_client)")

MAX_SECONDS = 4.0
MAX_UPLOAD_MB = 5.0
NOT_OFFERED = "is not one of the models this demo offers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_near_silent_flac(path: Path, seconds: int) -> Path:
    """A long FLAC of near-silence (a faint, sparse click), written a minute at a time: it compresses to little."""
    block = np.zeros(60 * 16_000, dtype=np.float32)
    block[::16_000] = 1e-3
    with sf.SoundFile(path, "w", samplerate=16_000, channels=1, format="FLAC") as f:
        for _ in range(seconds // 60):
            f.write(block)
    return path


@pytest.fixture(scope="module")
def models(trained_tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Two offered models (the first the default) and a loadable one the server does not offer."""
    root = tmp_path_factory.mktemp("demo-models")
    return {"default": trained_tiny_model,
            "second": Path(shutil.copytree(trained_tiny_model, root / "second")),
            "unlisted": Path(shutil.copytree(trained_tiny_model, root / "unlisted"))}


@pytest.fixture(scope="module")
def demo_url(models, tmp_path_factory):
    log = tmp_path_factory.mktemp("demo-server") / "demo.log"
    with served_demo(["--model", str(models["default"]), "--model", str(models["second"]),
                      "--max-seconds", str(MAX_SECONDS), "--max-upload-mb", str(MAX_UPLOAD_MB)], log) as url:
        yield url


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("demo-reliability-audio")
    files = write_tone_files(folder)
    files["long"] = _write_near_silent_flac(folder / "long.flac", 30 * 60)
    files["random"] = folder / "random.flac"
    files["random"].write_bytes(np.random.default_rng(0).bytes(50_000))
    files["text"] = folder / "notes.mp3"
    files["text"].write_text("this is text, not audio\n" * 100)
    rng = np.random.default_rng(1)
    files["noise"] = folder / "noise.wav"
    sf.write(files["noise"], 0.1 * rng.standard_normal(3 * 16_000).astype(np.float32), 16_000)
    return files


def _transcribe(client, path: Path, model: str = ""):
    return client.predict(gradio_client.handle_file(str(path)), "greedy", model, api_name="/transcribe")


def test_long_audio_is_refused_from_its_header_without_decoding(trained_tiny_model, tmp_path, monkeypatch,
                                                                 reliability):
    path = _write_near_silent_flac(tmp_path / "hour.flac", 60 * 60)
    assert path.stat().st_size < 2 * 2 ** 20  # an hour of near-silence: a small upload
    decoded = []
    monkeypatch.setattr(asr.serve.demo, "load_audio", lambda *a, **k: decoded.append(a) or pytest.fail("decoded"))
    with pytest.raises(DemoError, match=r"hour.flac is 3600 s long; this demo takes up to 5 s") as e:
        analyze(load_model(trained_tiny_model), str(path), "greedy", DemoLimits(max_seconds=5))
    assert decoded == []
    reliability("1 h FLAC of near-silence (0.1 MB) over --max-seconds", "web demo",
                f"refused from the header, not decoded: '{e.value}'")


def test_audio_too_big_to_decode_is_refused_from_its_header(trained_tiny_model, tmp_path, monkeypatch, reliability):
    path = tmp_path / "wide.flac"
    sf.write(path, np.zeros((3 * 192_000, 8), dtype=np.float32), 192_000)  # 3 s, 8 channels: 18 MB decoded
    monkeypatch.setattr(asr.serve.demo, "load_audio", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(DemoError, match=r"wide.flac would take 18 MB to decode \(8 channels at 192000 Hz\)") as e:
        analyze(load_model(trained_tiny_model), str(path), "greedy", DemoLimits(max_decoded_mb=10))
    reliability("short FLAC of many channels at a high rate, over the decode budget", "web demo",
                f"refused from the header, not decoded: '{e.value}'")


def test_the_demo_drops_words_in_noise_like_transcribe(trained_tiny_model, audio):
    model = load_model(trained_tiny_model)
    for name in ("noise", "cab"):
        expected = model.transcribe(audio[name])
        got = analyze(model, str(audio[name]), "greedy", DemoLimits())
        assert (got.text, [w[0] for w in got.words]) == (expected.text, [w.word for w in expected.words])


@pytest.mark.slow
def test_an_empty_model_means_the_servers_default(demo_url, audio, reliability):
    client = gradio_client.Client(demo_url, verbose=False)
    assert _transcribe(client, audio["cab"], "")[0] == "cab"
    reliability("API call with an empty model path", "web demo", "the server's default (first --model)")


@pytest.mark.slow
def test_the_model_box_offers_only_the_configured_models(demo_url, models, audio, tmp_path, reliability):
    config = json.loads(urllib.request.urlopen(demo_url + "config", timeout=10).read())
    dropdowns = [c["props"] for c in config["components"] if c.get("type") == "dropdown"]
    # the upload tab's box and the live tab's: each offers only the configured models
    assert [[v for _, v in d["choices"]] for d in dropdowns] == [[str(models["default"]), str(models["second"])]] * 2
    assert dropdowns[0]["value"] == str(models["default"])

    client = gradio_client.Client(demo_url, verbose=False)
    assert _transcribe(client, audio["fee"], str(models["second"]))[0] == "fee"
    messages = []
    for path in (models["unlisted"], tmp_path / "nowhere", Path("/etc/passwd"), Path("/etc")):
        with pytest.raises(gradio_client.exceptions.AppError) as e:
            _transcribe(client, audio["cab"], str(path))
        messages.append(str(e.value))
    assert len(set(messages)) == 1 and NOT_OFFERED in messages[0], messages
    assert "exist" not in messages[0] and "Cannot load" not in messages[0]
    reliability("model path not in the --model list (existing or not)", "web demo",
                f"refused, the same message either way: '{messages[0]}'")


@pytest.mark.slow
def test_fifty_parallel_requests_all_get_their_transcripts(demo_url, audio, reliability):
    client = gradio_client.Client(demo_url, verbose=False)
    texts = [TEXTS[i % len(TEXTS)] for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda t: _transcribe(client, audio[t])[0], texts))
    assert results == texts
    reliability("50 parallel API requests", "web demo", "all 50 transcripts right; the server keeps serving")


@pytest.mark.slow
def test_a_200_mb_upload_is_refused_quickly_and_the_server_keeps_serving(demo_url, audio, tmp_path, reliability):
    big = tmp_path / "big.wav"
    with open(big, "wb") as f:  # sparse: 200 MB on paper, nothing on disk
        f.truncate(200 * 2 ** 20)
    client = gradio_client.Client(demo_url, verbose=False)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client checks first
        _transcribe(client, big)
    start = time.perf_counter()
    with open(big, "rb") as f:  # a client that does not check: the server refuses by size
        r = httpx.post(demo_url + "gradio_api/upload", files=[("files", ("big.wav", f))], timeout=60)
    seconds = time.perf_counter() - start
    assert r.status_code == 413 and "exceeded maximum allowed size" in r.text, (r.status_code, r.text[:300])
    assert seconds < 20
    assert _transcribe(client, audio["bad egg"])[0] == "bad egg"
    reliability("200 MB upload", "web demo", f"HTTP 413 in {seconds:.1f} s: '{r.text}'")


@pytest.mark.slow
@pytest.mark.parametrize("name, message", [
    ("random", "Cannot use random.flac"), ("text", "Cannot use notes.mp3"), ("long", "long.flac is 1800 s long"),
])
def test_non_audio_and_long_uploads_get_a_message_and_the_next_request_works(demo_url, audio, name, message,
                                                                             reliability):
    client = gradio_client.Client(demo_url, verbose=False)
    with pytest.raises(gradio_client.exceptions.AppError, match=message) as e:
        _transcribe(client, audio[name])
    assert _transcribe(client, audio["dig a hole"])[0] == "dig a hole"
    reliability(f"upload: {audio[name].name} ({'30 min of near-silence' if name == 'long' else 'not audio'})",
                "web demo", f"message: '{e.value}'")


@pytest.mark.slow
def test_a_model_folder_that_cannot_load_stops_the_demo_at_its_start(tmp_path, reliability):
    cmd = [sys.executable, "-m", "asr.cli", "demo", "--model", str(tmp_path / "nowhere"), "--port", str(_free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("asr demo: error: Cannot load the model in ") and "nowhere" in proc.stderr
    message = proc.stderr.strip().replace(str(tmp_path), "DIR")
    reliability("asr demo --model FOLDER that is not a model", "CLI", f"exit 2: '{message}'")
