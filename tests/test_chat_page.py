"""The chat page (nvlm/serve/static) in a real browser: Debian's Chromium driven by playwright, against the real
app on a tiny random checkpoint.

One walk through the page: API key, image upload and its tile grid, an error shown inline (and the turn dropped),
a streamed answer, a second turn that carries the first. Skipped where Chromium or playwright is missing.
`NVLM_SAVE_SCREENSHOT=1` also writes tests/artifacts/chat_page.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
API_KEY = "page-test-key"
TIMEOUT_MS = 30_000


def _expected_grid(width: int, height: int, max_tiles: int) -> tuple[int, int]:
    """The (cols, rows) with at most `max_tiles` tiles whose ratio is closest to the image's. Only the clear-cut
    case: the test image is chosen so that no tie-break is involved."""
    aspect = width / height
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles]
    diffs = sorted((abs(aspect - c / r), (c, r)) for c, r in grids)
    assert diffs[0][0] < diffs[1][0], "the test image must not need a tie-break"
    return diffs[0][1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed")
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
    from nvlm.cli import main
    from nvlm.pipeline import load
    from nvlm.serve import ServeOptions, ServerThread, create_app
    from nvlm.serve.cli import build_engine

    ckpt = tmp_path_factory.mktemp("tiny_ckpt")
    assert main(["init", str(ckpt), "--preset", "tiny"]) == 0
    pipe = load(ckpt, device="cpu", dtype="float32")
    engine = build_engine(pipe, max_batch=2, max_len=512)
    app = create_app(pipe, engine, ServeOptions(model_name="tiny-page", api_key=API_KEY))
    with ServerThread(app) as url:
        yield url, pipe.config


def _draw_png(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (235, 240, 250))
    d = ImageDraw.Draw(img)
    w, h = size
    d.rectangle([w // 10, h // 8, w // 2, h // 2], fill=(220, 60, 50))
    d.ellipse([w // 2, h // 3, w - w // 8, h - h // 10], fill=(40, 110, 220))
    d.line([0, h - 1, w - 1, 0], fill=(30, 30, 30), width=6)
    img.save(path)


def test_chat_page(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, cfg = server
    size = (640, 480)
    png = tmp_path / "drawing.png"
    _draw_png(png, size)
    cols, rows = _expected_grid(*size, cfg.max_dynamic_patch)
    num_tiles = cols * rows + (1 if cfg.use_thumbnail and cols * rows > 1 else 0)
    assert (cfg.force_image_size, cfg.max_dynamic_patch) == (56, 6)
    assert (cols, rows, num_tiles) == (3, 2, 7)  # 640x480 on the tiny config

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.set_default_timeout(TIMEOUT_MS)
            chats, urls, page_errors = [], [], []
            page.on("request", lambda r: urls.append(r.url))
            page.on("request", lambda r: chats.append(r) if r.method == "POST" and
                    r.url.endswith("/v1/chat/completions") else None)
            page.on("pageerror", lambda e: page_errors.append(str(e)))

            # Without the key, /v1/models answers 401: the page says so and opens the settings.
            page.goto(url + "/")
            page.wait_for_selector("#model.bad")
            assert page.text_content("#model") == "API key needed"
            assert page.get_attribute("#settings", "open") is not None
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelector('#model').textContent === 'tiny-page'")
            assert page.evaluate("localStorage.getItem('nvlm.apiKey')") == API_KEY

            # The image, its grid (cols + 1 vertical and rows + 1 horizontal lines) and the tile count.
            page.set_input_files("#file", str(png))
            page.wait_for_selector("#tile-info[data-num-tiles]")
            info = page.text_content("#tile-info")
            assert f"{cols} × {rows} tiles" in info and f"+ thumbnail = {num_tiles}" in info, info
            assert f"{size[0]}×{size[1]} px" in info, info
            data = page.eval_on_selector("#tile-info", "e => ({...e.dataset})")
            assert data == {"cols": str(cols), "rows": str(rows), "numTiles": str(num_tiles)}
            assert page.locator("#grid line").count() == (cols + 1) + (rows + 1)
            assert page.is_visible("#preview-img")

            # A request the server refuses: the OpenAI error is shown inline and the turn is dropped.
            question1 = "What is in this picture?"
            page.fill("#max-tokens", "100000")
            page.fill("#temperature", "0")
            page.fill("#question", question1)
            page.click("#send")
            error = page.wait_for_selector(".message.error")
            assert "max_tokens" in error.text_content() or "context" in error.text_content(), error.text_content()
            assert page.locator(".message.assistant").count() == 0
            assert page.input_value("#question") == question1  # back in the box, ready to resend

            # Turn 1 streams in.
            page.fill("#max-tokens", "12")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.message.assistant .meta').length === 1")
            answer1 = page.locator(".message.assistant .text").nth(0).text_content()
            assert answer1 and answer1 != "(empty answer)"

            # Turn 2 carries turn 1 (with the image, which went with the first message that followed it).
            page.fill("#question", "And the colours?")
            page.press("#question", "Enter")
            page.wait_for_function("document.querySelectorAll('.message.assistant .meta').length === 2")
            answer2 = page.locator(".message.assistant .text").nth(1).text_content()
            assert answer2 and answer2 != "(empty answer)"
            assert not page.query_selector(".streaming")

            shot = tmp_path / "chat_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("NVLM_SAVE_SCREENSHOT") == "1":
                out = Path(__file__).parent / "artifacts" / "chat_page.png"
                out.parent.mkdir(exist_ok=True)
                shutil.copy(shot, out)

            # "New chat" clears the conversation and keeps the image for the next message.
            page.click("#new-chat")
            assert page.locator(".message").count() == 0
            assert page.text_content("#image-state") == "Goes with your next message"
        finally:
            browser.close()

    assert not page_errors, page_errors
    # Everything the page loaded came from the server itself (no CDN, no fonts from elsewhere).
    assert all(u.startswith(url) or u.startswith("data:") for u in urls), [u for u in urls if not u.startswith(url)]

    # The wire: three chat requests (the refused one, turn 1, turn 2), all with the key, all streamed.
    assert len(chats) == 3
    bodies = [r.post_data_json for r in chats]
    for r, body in zip(chats, bodies):
        assert r.headers.get("authorization") == f"Bearer {API_KEY}"
        assert body["stream"] is True and body["model"] == "tiny-page" and body["temperature"] == 0
    assert bodies[0]["max_tokens"] == 100000
    first = bodies[1]["messages"]
    assert bodies[1]["max_tokens"] == 12 and len(first) == 1  # the refused turn left no trace
    image_part, text_part = first[0]["content"]
    assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part == {"type": "text", "text": question1}
    second = bodies[2]["messages"]
    assert second[0] == first[0]
    assert second[1] == {"role": "assistant", "content": answer1}
    assert second[2] == {"role": "user", "content": "And the colours?"}
