"""Load: 64 concurrent streaming clients on loopback against a tiny checkpoint, a quarter of them hanging up
mid-stream. Afterwards the engine is idle (nothing running, nothing queued, no slot holding a request), exactly
the hung-up requests were cancelled, the others got complete streams, and a normal request still succeeds."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from nvlm.cli import main  # noqa: E402
from nvlm.serve import ServeOptions, ServerThread, create_app  # noqa: E402
from nvlm.serve.cli import build_engine  # noqa: E402

pytestmark = pytest.mark.slow

CLIENTS, HANG_UPS = 64, 16
TOKENS, LONG = 32, 1500


def _image(i: int) -> str:
    img = Image.new("RGB", (60 + 20 * i, 60), (40 * i, 100, 200))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import nvlm

    out = tmp_path_factory.mktemp("load") / "tiny"
    assert main(["init", str(out), "--preset", "tiny", "--seed", "1", "--std", "0.3"]) == 0
    pipe = nvlm.load(out, device="cpu", dtype="float32")
    engine = build_engine(pipe, max_batch=8, max_len=2048)
    app = create_app(pipe, engine, ServeOptions(model_name="tiny"))
    with ServerThread(app) as url:
        yield url, engine


async def _client(http: httpx.AsyncClient, url: str, i: int, images: list[str]) -> dict:
    hang_up = i % (CLIENTS // HANG_UPS) == 0
    content: list = [{"type": "text", "text": f"Client {i}: describe the picture."}]
    if i % 3 == 0:  # the client's own text before the image, so a repeated image is a vision-cache hit
        content = [{"type": "text", "text": f"Client {i}: <image>\ndescribe the picture."},
                   {"type": "image_url", "image_url": {"url": images[i % len(images)]}}]
    body = {"messages": [{"role": "user", "content": content}], "stream": True, "ignore_eos": True,
            "max_tokens": LONG if hang_up else TOKENS, "temperature": 0.7, "seed": i}
    got = {"hang_up": hang_up, "chunks": 0, "done": False, "finish": None, "error": None}
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        got["status"] = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                got["done"] = True
                break
            ev = json.loads(line[6:])
            if "error" in ev:
                got["error"] = ev["error"]
                continue
            choice = ev["choices"][0]
            got["chunks"] += 1
            got["finish"] = choice["finish_reason"] or got["finish"]
            if hang_up and got["chunks"] >= 4:  # the role chunk + 3 tokens, then hang up mid-stream
                break
    return got


async def _run(url: str) -> list[dict]:
    images = [_image(k) for k in range(3)]
    limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        return await asyncio.gather(*[_client(http, url, i, images) for i in range(CLIENTS)])


def test_64_streaming_clients_with_hang_ups(served):
    url, engine = served
    before = engine.stats.requests_cancelled
    t0 = time.monotonic()
    results = asyncio.run(asyncio.wait_for(_run(url), timeout=90))
    elapsed = time.monotonic() - t0
    assert all(r["status"] == 200 and r["error"] is None for r in results), results
    finished = [r for r in results if not r["hang_up"]]
    assert len(finished) == CLIENTS - HANG_UPS
    assert all(r["done"] and r["finish"] == "length" for r in finished)

    deadline = time.monotonic() + 10
    while (engine.num_running or engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.num_running == 0 and engine.queue_depth == 0
    assert all(s.request is None for s in engine.slots)
    assert engine.stats.requests_cancelled - before == HANG_UPS  # each hang-up freed its slot, nothing else did
    assert engine.stats.vision_hits > 0  # repeated images came from the vision cache

    r = httpx.post(url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 5})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    print(f"{CLIENTS} clients ({HANG_UPS} hang-ups) in {elapsed:.1f}s")
