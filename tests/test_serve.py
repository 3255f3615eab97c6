"""The OpenAI-compatible server on a tiny byte-tokenizer checkpoint, driven by the official `openai` client over
loopback: chat with images, streaming == non-streaming, logprobs, n, stops, usage and prefix-cache accounting,
completions, info routes, the tiles preview, a table of bad inputs (each a 4xx naming the problem), a model
failure (500, server keeps serving) and client disconnects freeing engine slots."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from nvlm.cli import main  # noqa: E402
from nvlm.image import preprocess  # noqa: E402
from nvlm.serve import ServeOptions, ServerThread, create_app  # noqa: E402
from nvlm.serve.app import STATIC_DIR  # noqa: E402
from nvlm.serve.cli import build_engine  # noqa: E402

KEY = "sk-test"
MAX_LEN = 512


def png(size=(120, 60), color="red") -> bytes:
    img = Image.new("RGB", size, color)
    img.paste((0, 0, 255), (0, 0, size[0] // 2, size[1] // 3))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny"
    assert main(["init", str(out), "--preset", "tiny", "--seed", "3", "--std", "0.3"]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(ckpt):
    import nvlm

    return nvlm.load(ckpt, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    (root / "allowed" / "cat.png").write_bytes(png((80, 80), "green"))
    (root / "secret.png").write_bytes(png((80, 80), "black"))
    return root


@pytest.fixture(scope="module")
def server(pipe, media):
    engine = build_engine(pipe, max_batch=4, max_len=MAX_LEN)
    opts = ServeOptions(model_name="tiny", api_key=KEY, max_images=2, max_image_pixels=200_000,
                        allowed_local_media_path=str(media / "allowed"))
    app = create_app(pipe, engine, opts)
    with ServerThread(app) as url:
        yield url, engine


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture(scope="module")
def engine(server):
    return server[1]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(url, path, body, key=KEY, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.num_running == 0 and engine.queue_depth == 0:
            return True
        time.sleep(0.02)
    return False


IMG = png()
QUESTION = [{"role": "user", "content": [image_part(data_url(IMG)), {"type": "text", "text": "What is in it?"}]}]


# ---- chat ----------------------------------------------------------------------------------------------------

def test_chat_with_an_image_matches_the_python_api(client, pipe):
    r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12,
                                       extra_body={"some_future_field": {"x": 1}})  # unknown fields are ignored
    ref_msgs = [{"role": "user", "content": "<image>\nWhat is in it?"}]
    img = Image.open(io.BytesIO(IMG))
    prepared = pipe.prepare(ref_msgs, [img])
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.usage.prompt_tokens == len(prepared.input_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    # the server's prompt and greedy decode are the pipeline's
    assert r.choices[0].message.content == pipe.chat(ref_msgs, [img], max_new_tokens=12).text


def test_streaming_deltas_equal_the_non_streamed_text(client):
    full = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    stop_token = 1 if r.choices[0].finish_reason == "stop" else 0  # the ending <|im_end|> has no entry
    assert len(content) == r.usage.completion_tokens - stop_token
    for e in content:
        tops = e.top_logprobs
        assert len(tops) == 3 and all(a.logprob >= b.logprob for a, b in zip(tops, tops[1:]))
        assert e.logprob <= 0 and abs(e.logprob - tops[0].logprob) < 1e-5  # greedy picks the top token
        assert isinstance(e.bytes, list) and all(0 <= b < 256 for b in e.bytes)
    streamed = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10, logprobs=True,
                                                   top_logprobs=3, stream=True))
    got = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert got == [e.token for e in content]


def test_n_choices_are_seeded(client):
    kw = dict(model="tiny", messages=QUESTION, max_tokens=8, n=2, temperature=1.0, seed=5)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens <= 16 and a.usage.prompt_tokens == b.usage.prompt_tokens
    streamed = client.chat.completions.create(stream=True, **kw)
    texts = {0: "", 1: ""}
    for c in streamed:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in a.choices]


def test_stop_strings_cut_the_text(client):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stop = next(ch for ch in text[1:] if ch.isascii() and ch.isprintable())
    expected = text[:text.index(stop)]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, stop=[stop, "never-seen"],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.usage.completion_tokens  # the engine stopped early
    s = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, stop=stop, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == expected


def test_a_follow_up_turn_reuses_the_cached_prefix(client):
    first = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6)
    follow = QUESTION + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And the colour?"}]
    r = client.chat.completions.create(model="tiny", messages=follow, max_tokens=6)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1 and cached < r.usage.prompt_tokens


def test_system_message_overrides_the_default(client, pipe):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    assert r.usage.prompt_tokens == len(pipe.prepare(msgs[1:], system="Be brief.").input_ids)


def test_file_url_under_the_allowed_dir(client, media):
    url = (media / "allowed" / "cat.png").as_uri()
    r = client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "user", "content": [image_part(url), {"type": "text", "text": "?"}]}])
    assert r.usage.prompt_tokens > 4


# ---- completions and info routes -----------------------------------------------------------------------------

def test_completions(client, pipe):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, logprobs=2)
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(pipe.tokenizer.encode("Once upon a time"))
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    s = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text
    ids = client.completions.create(model="tiny", prompt=pipe.tokenizer.encode("Once upon a time"), max_tokens=8)
    assert ids.choices[0].text == r.choices[0].text
    two = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=3)
    assert [c.index for c in two.choices] == [0, 1]


def test_models_health_metrics(client, url):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(url + "/health").json()["status"] == "ok"  # no key needed
    text = httpx.get(url + "/metrics").text
    for name in ("nvlm_num_requests_waiting", "nvlm_num_requests_running", "nvlm_generation_tokens_total",
                 "nvlm_generation_tokens_per_second", "nvlm_time_to_first_token_seconds_bucket",
                 "nvlm_inter_token_latency_seconds_count", "nvlm_vision_cache_hits_total",
                 "nvlm_prefix_cache_hits_total", "nvlm_prompt_cached_tokens_total", "nvlm_http_responses_total"):
        assert name in text, name
    hits = next(line for line in text.splitlines() if line.startswith("nvlm_prefix_cache_hits_total "))
    assert int(hits.split()[1]) >= 1


def test_tiles_preview(url, pipe):
    raw = png((300, 100))
    ref = preprocess(raw, max_tiles=6, image_size=pipe.config.image_size)
    r = post(url, "/v1/nvlm/tiles", {"image_url": {"url": data_url(raw)}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["grid"] == list(ref.grid) and body["num_tiles"] == ref.num_tiles
    assert (body["width"], body["height"]) == (300, 100)
    m = httpx.post(url + "/v1/nvlm/tiles", files={"file": ("x.png", raw, "image/png")}, data={"max_tiles": "2"},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert m.status_code == 200, m.text
    ref2 = preprocess(raw, max_tiles=2, image_size=pipe.config.image_size)
    assert m.json()["grid"] == list(ref2.grid) and m.json()["num_tiles"] == ref2.num_tiles


def test_root_serves_the_chat_page_when_present(url):
    r = httpx.get(url + "/")
    if (STATIC_DIR / "index.html").is_file():
        assert r.status_code == 200 and "html" in r.headers["content-type"]
    else:
        assert r.status_code == 404 and "chat page" in r.json()["error"]["message"]


# ---- bad input -----------------------------------------------------------------------------------------------

def _chat(*parts, **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 2, **extra}


def _text(t="hi"):
    return {"type": "text", "text": t}


BAD = [
    ("bad base64", _chat(image_part("data:image/png;base64,@@not*base64@@"), _text()), 400, "base64"),
    ("not an image", _chat(image_part(data_url(b"hello, world", "image/png")), _text()), 400, "cannot identify"),
    ("over the pixel limit", _chat(image_part(data_url(png((600, 400)))), _text()), 400, "max_pixels"),
    ("too many images", _chat(*[image_part(data_url(IMG))] * 3, _text()), 400, "too many images"),
    ("file outside the allowed dir", "FILE_OUTSIDE", 400, "outside the allowed"),
    ("missing file", "FILE_MISSING", 400, "no such file"),
    ("remote images off", _chat(image_part("http://127.0.0.1:9/x.png"), _text()), 400, "--allow-remote-images"),
    ("unsupported URL scheme", _chat(image_part("ftp://x/y.png"), _text()), 400, "unsupported image URL"),
    ("prompt longer than the context", {"messages": [{"role": "user", "content": "x" * 600}]}, 400, "context"),
    ("prompt + max_tokens over the context", {"messages": [{"role": "user", "content": "x" * 300}],
                                              "max_tokens": 400}, 400, "context"),
    ("temperature of the wrong type", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     400, "'temperature' must be a number"),
    ("messages missing", {"model": "tiny"}, 400, "'messages' is required"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be"),
    ("n out of range", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "'n' must be"),
    ("stop of the wrong type", {"messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, "'stop'"),
    ("max_tokens is a boolean", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400,
     "'max_tokens' must be an integer"),
    ("placeholders without images", {"messages": [{"role": "user", "content": "<image> hi"}]}, 400, "placeholder"),
    ("unknown part type", _chat({"type": "audio", "audio": "x"}), 400, "unsupported content part"),
    ("invalid JSON", b"{not json", 400, "not valid JSON"),
    ("unknown model", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ("missing API key", {"messages": [{"role": "user", "content": "hi"}], "__key": None}, 401, "API key"),
    ("wrong API key", {"messages": [{"role": "user", "content": "hi"}], "__key": "sk-wrong"}, 401, "API key"),
]


@pytest.mark.parametrize("name,body,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_with_an_openai_error(url, engine, media, name, body, status, needle):
    key = KEY
    if body == "FILE_OUTSIDE":  # a path that climbs out of the allowed directory
        body = _chat(image_part("file://" + str(media / "allowed") + "/../secret.png"), _text())
    elif body == "FILE_MISSING":
        body = _chat(image_part((media / "allowed" / "nope.png").as_uri()), _text())
    if isinstance(body, dict) and "__key" in body:
        key = body.pop("__key")
    if isinstance(body, bytes):
        r = httpx.post(url + "/v1/chat/completions", content=body, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    else:
        r = post(url, "/v1/chat/completions", body, key=key)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"], err["message"]
    assert wait_idle(engine)


def test_unknown_route_and_the_openai_client_errors(url, client):
    r = httpx.get(url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"temperature": "hot"})


def test_a_model_failure_is_a_500_and_the_server_keeps_serving(client, pipe, engine, monkeypatch):
    def boom(pixel_values):
        raise RuntimeError("vision tower exploded")

    monkeypatch.setattr(pipe.model, "extract_features", boom)
    msgs = [{"role": "user", "content": [image_part(data_url(png((64, 64), "yellow"))), _text()]}]
    with pytest.raises(openai.InternalServerError, match="vision tower exploded"):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
    events = [json.loads(line[6:]) for line in _stream_lines(client, msgs)]
    assert any("error" in e and "vision tower exploded" in e["error"]["message"] for e in events)
    monkeypatch.undo()
    assert wait_idle(engine)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def _stream_lines(client, msgs):
    url = str(client.base_url).rstrip("/") + "/chat/completions"
    with httpx.stream("POST", url, json={"messages": msgs, "max_tokens": 4, "stream": True}, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line.startswith("data: {")]


# ---- disconnects ---------------------------------------------------------------------------------------------

def test_client_disconnects_cancel_the_engine_request(url, engine, pipe, monkeypatch):
    lm = pipe.model.language_model
    forward = lm.forward

    def slow_forward(*a, **kw):  # 400 tokens now take >= 2 s: the clients surely leave before the end
        time.sleep(0.005)
        return forward(*a, **kw)

    monkeypatch.setattr(lm, "forward", slow_forward)
    before = engine.stats.requests_cancelled
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "ignore_eos": True}
    # streaming: read a few chunks, then hang up
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    # non-streaming: give up waiting
    with pytest.raises(httpx.ReadTimeout):
        post(url, "/v1/chat/completions", body, timeout=0.3)
    deadline = time.monotonic() + 10
    while engine.stats.requests_cancelled < before + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats.requests_cancelled == before + 2
    assert wait_idle(engine) and all(s.request is None for s in engine.slots)


# ---- the CLI verb --------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:weight-only int8")
def test_serve_cli_builds_the_app(ckpt, media, monkeypatch):
    import argparse

    import uvicorn
    from fastapi.testclient import TestClient

    from nvlm.serve.cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="nvlm")
    add_serve_parser(parser.add_subparsers())
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    args = parser.parse_args(["serve", "--model", str(ckpt), "--dtype", "float32", "--device", "cpu", "--port",
                              "8123", "--max-batch", "2", "--max-len", "256", "--quantize", "int8",
                              "--served-model-name", "tiny-q", "--max-images", "1",
                              "--allowed-local-media-path", str(media)])
    assert args.func(args) == 0
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 8123)
    with TestClient(ran["app"]) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny-q"
        r = c.post("/v1/chat/completions", json={"model": "tiny-q", "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    bad = parser.parse_args(["serve", "--model", str(ckpt), "--allowed-local-media-path", str(media / "nope")])
    with pytest.raises(ValueError, match="not a directory"):
        bad.func(bad)
