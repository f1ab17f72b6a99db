"""The README's picture of the demo: serve it, upload one file in a headless browser, transcribe, save the page.

    python demo/screenshot.py AUDIO --out docs/demo.png [--model FOLDER] [--chromium /usr/bin/chromium]

Needs the dev extra (playwright) and a Chromium (tests/install-system-packages.sh installs Debian's).
"""

from __future__ import annotations

import argparse
import shutil

import torch
from PIL import Image

from asr.serve.demo import ModelChoices, build_app, default_model_dir


def screenshot(model: str, audio: str, out: str, chromium: str, width: int = 1280) -> str:
    """Transcribe `audio` with the model's own decoder in the demo page; save the page to `out`; return the text."""
    from playwright.sync_api import expect, sync_playwright

    models = ModelChoices([model])
    models.load_all()
    app = build_app(models)
    app.queue().launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)  # the first free port
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": width, "height": 1300})
            page.goto(app.local_url)
            upload = page.locator("input[type=file]").first
            upload.wait_for(state="attached", timeout=60_000)
            upload.set_input_files(audio)
            page.get_by_role("button", name="Transcribe").click()
            expect(page.get_by_text("real-time factor")).to_be_visible(timeout=120_000)
            page.wait_for_timeout(1000)  # the plots finish drawing
            text = page.locator("#transcript textarea").input_value()
            page.screenshot(path=out, full_page=True)
            browser.close()
    finally:
        app.close()
    Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)  # 256 colours: 40 % of the bytes
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio", help="the file to upload")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--model", default=None, help="a model folder (default: the shipped model)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    torch.set_grad_enabled(False)  # as `asr demo` does: no autograd in this process
    text = screenshot(args.model or str(default_model_dir()), args.audio, args.out, args.chromium)
    print(f"{args.out}: {text!r}")


if __name__ == "__main__":
    main()
