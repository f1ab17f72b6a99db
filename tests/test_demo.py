"""The web demo, served for real: driven in headless Chromium (Playwright) and through gradio_client."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from .conftest import TEXTS, chromium_path, served_demo, tone_speech, write_tone_files

gradio_client = pytest.importorskip("gradio_client", reason="the demo tests need the dev extra (gradio_client)")

MAX_SECONDS = 4.0
MAX_UPLOAD_MB = 0.5


@pytest.fixture(scope="module")
def demo_url(trained_tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with served_demo(["--model", str(trained_tiny_model), "--max-seconds", str(MAX_SECONDS),
                      "--max-upload-mb", str(MAX_UPLOAD_MB)], log) as url:
        assert "127.0.0.1" in log.read_text()  # local only unless --host says otherwise
        yield url


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("demo-audio")
    files = write_tone_files(folder)
    (folder / "notes.wav").write_text("this is text, not audio\n")
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16_000)
    sf.write(folder / "silent.wav", np.zeros(16_000, dtype=np.float32), 16_000)
    sf.write(folder / "long.wav", np.tile(tone_speech("ace"), 12), 16_000)  # about 5.5 s
    rng = np.random.default_rng(0)
    sf.write(folder / "big.wav", 0.1 * rng.standard_normal(16_000 * 20).astype(np.float32), 16_000)  # 640 kB
    for name in ("notes", "empty", "silent", "long", "big"):
        files[name] = folder / f"{name}.wav"
    return files


def _transcribe(client, path: Path, model: str = ""):
    return client.predict(gradio_client.handle_file(str(path)), "greedy", model, api_name="/transcribe")


@pytest.mark.slow
def test_twenty_simultaneous_api_calls_all_return_their_transcripts(demo_url, audio_files, trained_tiny_model):
    client = gradio_client.Client(demo_url, verbose=False)
    texts = [TEXTS[i % len(TEXTS)] for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda t: _transcribe(client, audio_files[t], str(trained_tiny_model)), texts))
    assert [r[0] for r in results] == texts
    text, words, spectrogram, posteriorgram, timing = results[0]
    assert [w[0] for w in words["data"]] == texts[0].split()
    starts_ends = [(w[1], w[2]) for w in words["data"]]
    assert all(0 <= s < e for s, e in starts_ends) and starts_ends == sorted(starts_ends)
    assert spectrogram and posteriorgram and "real-time factor" in timing


@pytest.mark.slow
@pytest.mark.parametrize("name, message", [
    ("notes", "Cannot use notes.wav"), ("empty", "Cannot use empty.wav"), ("silent", "silent.wav is silent"),
    ("long", f"up to {MAX_SECONDS:.0f} s"),
])
def test_bad_input_gets_a_clear_message_and_the_app_keeps_serving(demo_url, audio_files, trained_tiny_model,
                                                                  name, message):
    client = gradio_client.Client(demo_url, verbose=False)
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        _transcribe(client, audio_files[name], str(trained_tiny_model))
    assert _transcribe(client, audio_files["cab"], str(trained_tiny_model))[0] == "cab"


@pytest.mark.slow
def test_a_model_folder_not_offered_is_refused(demo_url, audio_files, tmp_path):
    client = gradio_client.Client(demo_url, verbose=False)
    with pytest.raises(gradio_client.exceptions.AppError, match="not one of the models this demo offers"):
        _transcribe(client, audio_files["cab"], str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_browser_upload_shows_transcript_words_and_plots(demo_url, audio_files, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (dev extra)")
    chromium = chromium_path()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1300})
        page.goto(demo_url)
        upload = page.locator("input[type=file]").first
        upload.wait_for(state="attached", timeout=60_000)
        upload.set_input_files(str(audio_files["dig a hole"]))
        page.get_by_role("button", name="Transcribe").click()
        transcript = page.locator("#transcript textarea")
        sync_api.expect(transcript).to_have_value("dig a hole", timeout=60_000)
        sync_api.expect(page.get_by_text("real-time factor")).to_be_visible()
        sync_api.expect(page.get_by_role("gridcell", name="hole", exact=True)).to_be_visible()
        assert page.locator(".js-plotly-plot, img, svg, canvas").count() > 0
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        assert (tmp_path / "demo.png").stat().st_size > 10_000

        page.reload()
        upload = page.locator("input[type=file]").first
        upload.wait_for(state="attached", timeout=60_000)
        upload.set_input_files(str(audio_files["big"]))  # over --max-upload-mb: refused in the page
        sync_api.expect(page.get_by_text("exceed the maximum allowed size")).to_be_visible(timeout=30_000)

        page.reload()
        upload = page.locator("input[type=file]").first
        upload.wait_for(state="attached", timeout=60_000)
        upload.set_input_files(str(audio_files["silent"]))
        page.get_by_role("button", name="Transcribe").click()
        sync_api.expect(page.get_by_text("silent.wav is silent")).to_be_visible(timeout=30_000)
        browser.close()


@pytest.mark.slow
def test_the_readme_screenshot_script_transcribes_in_the_page_and_saves_it(trained_tiny_model, audio_files,
                                                                           tmp_path):
    pytest.importorskip("playwright.sync_api", reason="the screenshot needs playwright (dev extra)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("screenshot", Path(__file__).parents[1] / "demo" / "screenshot.py")
    screenshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshot)
    out = tmp_path / "demo.png"
    text = screenshot.screenshot(str(trained_tiny_model), str(audio_files["dig a hole"]), str(out), chromium_path())
    assert text == "dig a hole" and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.is_grad_enabled()  # the tests after this one train in the same process


def test_a_word_piece_posteriorgram_shows_the_blank_and_the_tokens_heard_most():
    from asr.serve.demo import POSTERIORGRAM_ROWS, Analysis, posteriorgram_figure, shown_tokens

    probs = np.full((256, 50), 0.001, dtype=np.float32)
    probs[0] = 0.5
    heard = [7, 200, 31]
    for frame, token in enumerate(heard):
        probs[token, 10 * frame] = 0.9
    rows = shown_tokens(probs)
    assert len(rows) == POSTERIORGRAM_ROWS and rows[0] == 0 and set(heard) <= set(rows) and rows == sorted(rows)
    assert shown_tokens(probs[:29]) == list(range(29))  # characters: every row
    tokens = ["<blank>"] + [f"\u2581t{i}" for i in range(1, 256)]
    figure = posteriorgram_figure(Analysis("", [], np.zeros((64, 100)), probs, tokens, 1.0, 0.1), 0.02)
    axes = figure.axes[0]
    assert len(axes.get_yticklabels()) == POSTERIORGRAM_ROWS and "heard most" in axes.get_title()
    assert "\u2581t200" in [t.get_text() for t in axes.get_yticklabels()]
