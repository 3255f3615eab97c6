"""The OpenAI-compatible HTTP app: a thin FastAPI adapter over `Pipeline` (prompts) and `Engine` (generation).

Notable:
- Request bodies are parsed by `protocol.py` in a worker thread (image download/decode, tokenization) into prompt
  ids + `ImageInput`s; the engine runs in its own background thread and its events are bridged into asyncio with
  `loop.call_soon_threadsafe(queue.put_nowait, ...)`.
- Each choice's `TextAssembler` runs in the engine thread, inside the engine's `should_stop` hook and event
  callback, so a stop string ends the request at the token that completes it, and the text the client sees is
  cut before it (a held-back tail is flushed at the end). The same code serves streamed and non-streamed requests,
  which is why the concatenated deltas equal the non-streamed text.
- Client disconnects cancel the engine requests (streaming: Starlette cancels the generator and a background task
  makes sure; non-streaming: a task waits for `http.disconnect`), so their slots are freed at once.
- Every error is an OpenAI body `{"error": {"message", "type", "param", "code"}}`: 4xx for bad input (parsing,
  engine admission `RequestError`), 401 for a bad API key, 404 for unknown routes, 500 when the model fails (the
  engine fails that request and keeps serving).
- `model` must be the served name (or the checkpoint path) when given, else 404 `model_not_found`, as in vLLM.
  Sampling defaults to greedy (`temperature` 0, SPEC 11.5), not OpenAI's 1.0.
- `/` serves `static/index.html` and `/static/*` the files beside it, when they exist (a chat page).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import hmac
import json
import secrets
import threading
import time
from collections import Counter
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, Request as EngineRequest, RequestError
from ..generate import TextAssembler
from .protocol import (APIError, GenSpec, ParsedRequest, ServeOptions, TokenText, bad_request, chat_logprob_entry,
                       completion_logprobs, decode_image, parse_chat, parse_completion, read_image_url, tile_info)

STATIC_DIR = Path(__file__).parent / "static"


# ---- one request's choices, bridged from the engine thread ---------------------------------------------------

class _Choice:
    """One engine request (one choice). `_should_stop` and `_on_event` run in the engine thread."""

    def __init__(self, index: int, spec: GenSpec, seed: int | None, request_id: str, tokenizer, put):
        self.index = index
        self.stop_ids = () if spec.ignore_eos else tuple(tokenizer.stop_ids)
        self.asm = TextAssembler(tokenizer.decode, self.stop_ids, spec.params.stop)
        self.fed = 0  # tokens given to the assembler
        self.seen = 0  # tokens announced by events
        self.pending = ""
        self.put = put
        self.finished = False
        self.submitted = False
        params = spec.params if seed is None else spec.params.replace(seed=seed)
        self.request = EngineRequest(spec.prompt_ids, params, spec.images, request_id=request_id,
                                     stop_ids=() if spec.ignore_eos else None, on_event=self._on_event,
                                     should_stop=self._should_stop if spec.params.stop else None)

    def _should_stop(self, output_ids: list[int]) -> bool:
        while self.fed < len(output_ids):
            self.pending += self.asm.add(output_ids[self.fed])
            self.fed += 1
        return self.asm.finished

    def _on_event(self, ev) -> None:
        if ev.token_id is not None:
            self.seen += 1
            if self.fed < self.seen:  # the engine did not ask `should_stop` about this token
                self.pending += self.asm.add(ev.token_id)
                self.fed = self.seen
        if ev.finished:
            self.pending += self.asm.flush()
        delta, self.pending = self.pending, ""
        self.put((self, ev, delta))

    def counts_in_logprobs(self, ev) -> bool:
        """The stop token that ended a choice is not part of its text, so it gets no logprob entry."""
        return ev.token_id is not None and not (ev.finish_reason == "stop" and ev.token_id in self.stop_ids)


class _Generation:
    def __init__(self, engine: Engine, tokenizer, parsed: ParsedRequest, rid: str):
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.queue: asyncio.Queue = asyncio.Queue()

        def put(item):
            loop.call_soon_threadsafe(self.queue.put_nowait, item)

        self.choices: list[_Choice] = []
        for spec in parsed.specs:
            for j in range(spec.n):
                seed = None if spec.params.seed is None else spec.params.seed + j
                i = len(self.choices)
                self.choices.append(_Choice(i, spec, seed, f"{rid}-{i}", tokenizer, put))
        self.remaining = len(self.choices)
        self.specs = parsed.specs

    def submit(self) -> None:
        try:
            for c in self.choices:
                self.engine.submit(c.request)
                c.submitted = True
        except RequestError as e:
            self.cancel()
            code = "context_length_exceeded" if "context" in str(e) else None
            raise APIError(400, str(e), param="max_tokens" if code else None, code=code) from None

    async def next(self, timeout: float | None = None):
        item = await (asyncio.wait_for(self.queue.get(), timeout) if timeout else self.queue.get())
        choice, ev, _ = item
        if ev.finished and not choice.finished:
            choice.finished = True
            self.remaining -= 1
        return item

    def cancel(self) -> None:
        for c in self.choices:
            if c.submitted and not c.finished:
                self.engine.cancel(c.request.request_id)

    def usage(self) -> dict:
        prompt = sum(len(s.prompt_ids) for s in self.specs)
        completion = sum(len(c.request.output_ids) for c in self.choices)
        cached, k = 0, 0
        for s in self.specs:  # a prompt's cached tokens: those of its first choice
            cached += self.choices[k].request.cached_tokens
            k += s.n
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def _failure(ev) -> APIError:
    if ev.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled by the server", type="service_unavailable")
    return APIError(500, f"generation failed: {ev.error or 'unknown error'}", type="server_error")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# ---- middleware: API key + status counters -------------------------------------------------------------------

class _Gate:
    """Pure ASGI: checks the API key on /v1/* and counts responses by status (for /metrics)."""

    def __init__(self, app, api_key: str | None, statuses: Counter):
        self.app, self.api_key, self.statuses = app, api_key, statuses

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            token = headers.get(b"x-api-key", b"").decode("latin-1")
        return hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.statuses[message["status"]] += 1
            await send(message)

        if self.api_key and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(scope):
            err = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
            return await JSONResponse(err.body(), status_code=401,
                                      headers={"WWW-Authenticate": "Bearer"})(scope, receive, counted_send)
        await self.app(scope, receive, counted_send)


# ---- metrics -------------------------------------------------------------------------------------------------

class _Rate:
    """Generated tokens per second between scrapes (at least 1 s apart)."""

    def __init__(self):
        self.t, self.tokens, self.rate = time.perf_counter(), 0, 0.0

    def update(self, tokens: int) -> float:
        now = time.perf_counter()
        if now - self.t >= 1.0:
            self.rate = (tokens - self.tokens) / (now - self.t)
            self.t, self.tokens = now, tokens
        return self.rate


def render_metrics(engine: Engine, rate: _Rate, statuses: Counter) -> str:
    s = engine.stats
    out: list[str] = []

    def metric(name: str, kind: str, help: str, value) -> None:
        out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"])

    metric("nvlm_num_requests_waiting", "gauge", "Requests queued for a slot.", engine.queue_depth)
    metric("nvlm_num_requests_running", "gauge", "Requests being decoded.", engine.num_running)
    metric("nvlm_max_batch", "gauge", "Most requests decoded together.", engine.max_batch)
    metric("nvlm_generation_tokens_per_second", "gauge", "Generated tokens per second since the previous scrape.",
           f"{rate.update(s.generated_tokens):.3f}")
    for name, help, value in [
        ("nvlm_requests_finished_total", "Requests that ended with a stop or the length limit.", s.requests_finished),
        ("nvlm_requests_cancelled_total", "Requests cancelled (client went away).", s.requests_cancelled),
        ("nvlm_requests_rejected_total", "Requests the engine refused (too long).", s.requests_rejected),
        ("nvlm_prompt_tokens_total", "Prompt tokens admitted.", s.prompt_tokens),
        ("nvlm_prompt_cached_tokens_total", "Prompt tokens served from the prefix cache.", s.prefix_cached_tokens),
        ("nvlm_generation_tokens_total", "Tokens generated.", s.generated_tokens),
        ("nvlm_vision_cache_hits_total", "Images whose features came from the vision cache.", s.vision_hits),
        ("nvlm_vision_cache_misses_total", "Images run through the vision encoder.", s.vision_misses),
        ("nvlm_prefix_cache_hits_total", "Admissions that reused a cached prefix.", s.prefix_hits),
        ("nvlm_prefix_cache_misses_total", "Admissions that prefilled from scratch.", s.prefix_misses),
    ]:
        metric(name, "counter", help, value)
    for name, help, h in [("nvlm_time_to_first_token_seconds", "Time from arrival to the first token.", s.ttft),
                          ("nvlm_inter_token_latency_seconds", "Time between consecutive tokens.", s.itl)]:
        out += [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        counts, acc = list(h.counts), 0  # engine buckets are per-bucket; Prometheus wants cumulative
        for le, c in zip(h.buckets, counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        acc += counts[-1]
        out += [f'{name}_bucket{{le="+Inf"}} {acc}', f"{name}_sum {h.sum:.6f}", f"{name}_count {acc}"]
    out += ["# HELP nvlm_http_responses_total HTTP responses by status code.",
            "# TYPE nvlm_http_responses_total counter"]
    out += [f'nvlm_http_responses_total{{code="{code}"}} {n}' for code, n in sorted(statuses.items())]
    return "\n".join(out) + "\n"


# ---- the app -------------------------------------------------------------------------------------------------

async def _read_json(request: Request, limit: int):
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"the request body is over the {limit:,}-byte limit", code="request_too_large")
    if not data:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None


async def _read_body(request: Request, limit: int) -> bytes:
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"the request body is over the {limit:,}-byte limit", code="request_too_large")
    return bytes(data)


def create_app(pipe, engine: Engine, options: ServeOptions | None = None, *, manage_engine: bool = True) -> FastAPI:
    """The app for `pipe` (tokenizer, config) and `engine` (generation). With `manage_engine`, the app's lifespan
    starts the engine's thread and shuts it down."""
    opts = options or ServeOptions()
    tokenizer, cfg = pipe.tokenizer, pipe.config
    token_text = TokenText(tokenizer)
    statuses: Counter = Counter()
    rate = _Rate()
    created = int(time.time())
    aliases = {opts.model_name} | ({str(pipe.path)} if pipe.path else set())  # accepted as `model`

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.shutdown()

    app = FastAPI(title="nvlm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.pipe, app.state.engine, app.state.options = pipe, engine, opts
    app.add_middleware(_Gate, api_key=opts.api_key, statuses=statuses)

    # -- errors
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return JSONResponse(bad_request(str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    # -- info routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine, rate, statuses),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": opts.model_name, "object": "model", "created": created,
                                            "owned_by": "nvlm", "root": str(pipe.path or opts.model_name),
                                            "max_model_len": engine.max_len}]}

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise APIError(404, "no chat page in this build (nvlm/serve/static/index.html)")
        return FileResponse(page)

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    # -- tiles preview for the chat page
    @app.post("/v1/nvlm/tiles")
    async def tiles(request: Request):
        ctype = request.headers.get("content-type", "")
        body = await _read_body(request, opts.max_request_bytes)
        max_tiles_raw = None
        if ctype.startswith("multipart/form-data"):
            raw, fields = _multipart(body, ctype)
            max_tiles_raw = fields.get("max_tiles")
            if max_tiles_raw is not None:
                try:
                    max_tiles_raw = int(max_tiles_raw)
                except ValueError:
                    raise bad_request(f"'max_tiles' must be an integer, got {max_tiles_raw!r}", "max_tiles") from None
        elif ctype.startswith("image/") or ctype.startswith("application/octet-stream"):
            raw = body
        else:
            try:
                obj = json.loads(body)
            except ValueError as e:
                raise bad_request(f"send JSON {{'image_url': {{'url': ...}}}}, multipart with a 'file' field, or "
                                  f"raw image bytes; the body is not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise bad_request("the request body must be a JSON object")
            url = obj.get("image_url", obj.get("url", obj.get("image")))
            if isinstance(url, dict):
                url = url.get("url")
            if not isinstance(url, str):
                raise bad_request("'image_url' must be a URL string or {'url': string}", "image_url")
            max_tiles_raw = obj.get("max_tiles")
            raw = await anyio.to_thread.run_sync(read_image_url, url, opts, "image")
        limit = opts.max_tiles or cfg.max_dynamic_patch
        max_tiles = limit if max_tiles_raw is None else max_tiles_raw
        if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or not 1 <= max_tiles <= limit:
            raise bad_request(f"'max_tiles' must be an integer between 1 and {limit}", "max_tiles")
        w, h, _ = await anyio.to_thread.run_sync(decode_image, raw, opts, "image")
        info = tile_info(w, h, cfg, max_tiles)
        return {"grid": list(info.grid), "num_tiles": info.num_tiles, "width": w, "height": h,
                "tile_size": cfg.image_size, "thumbnail": info.num_tiles > info.grid[0] * info.grid[1],
                "max_tiles": max_tiles, "num_image_tokens": info.num_tiles * cfg.tokens_per_tile}

    # -- generation
    async def _start(request: Request, parse, prefix: str) -> tuple[ParsedRequest, _Generation, str]:
        body = await _read_json(request, opts.max_request_bytes)
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model not in aliases:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {opts.model_name!r}",
                           param="model", code="model_not_found")
        parsed = await anyio.to_thread.run_sync(parse, body, pipe, opts, engine.max_len)
        rid = f"{prefix}-{secrets.token_hex(12)}"
        gen = _Generation(engine, tokenizer, parsed, rid)
        gen.submit()
        return parsed, gen, rid

    async def _collect(request: Request, gen: _Generation):
        """Run every choice to the end -> per choice (text, [(tok, lp, top)], finish_reason)."""
        texts = {c.index: [] for c in gen.choices}
        entries = {c.index: [] for c in gen.choices}
        reasons = {}

        watcher = asyncio.create_task(_watch_disconnect(request, gen))
        try:
            while gen.remaining:
                choice, ev, delta = await gen.next()
                texts[choice.index].append(delta)
                if ev.logprob is not None and choice.counts_in_logprobs(ev):
                    entries[choice.index].append((ev.token_id, ev.logprob, ev.top_logprobs))
                if ev.finished:
                    if ev.finish_reason not in ("stop", "length"):
                        raise _failure(ev)
                    reasons[choice.index] = ev.finish_reason
        finally:
            watcher.cancel()
            gen.cancel()
        return [("".join(texts[i]), entries[i], reasons[i]) for i in sorted(texts)]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed, gen, rid = await _start(request, parse_chat, "chatcmpl")
        model = opts.model_name
        if parsed.stream:
            return _stream(request, gen, _chat_chunks(gen, parsed, rid, model, token_text))
        results = await _collect(request, gen)
        choices = []
        for i, (text, entries, reason) in enumerate(results):
            logprobs = None
            if parsed.logprobs:
                logprobs = {"content": [chat_logprob_entry(token_text, t, lp, top, parsed.top_logprobs)
                                        for t, lp, top in entries]}
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": reason})
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": choices, "usage": gen.usage()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed, gen, rid = await _start(request, parse_completion, "cmpl")
        model = opts.model_name
        if parsed.stream:
            return _stream(request, gen, _completion_chunks(gen, parsed, rid, model, token_text))
        results = await _collect(request, gen)
        choices = []
        for i, (text, entries, reason) in enumerate(results):
            lp = completion_logprobs(token_text, entries, parsed.top_logprobs) if parsed.logprobs else None
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": choices, "usage": gen.usage()}

    return app


async def _watch_disconnect(request: Request, gen: _Generation) -> None:
    """Cancel the engine requests when the client hangs up (the body has been read: only a disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.cancel()
            return


def _stream(request: Request, gen: _Generation, chunks) -> StreamingResponse:
    async def body():
        # Starlette cancels this generator on a disconnect under ASGI spec < 2.4 (uvicorn); the watcher covers
        # servers where it does not.
        watcher = asyncio.create_task(_watch_disconnect(request, gen))
        try:
            async for chunk in chunks:
                yield chunk
        finally:  # the client went away or we are done: free the slots
            watcher.cancel()
            gen.cancel()

    # The background task runs even when the body generator never started (a disconnect before the first chunk).
    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(gen.cancel),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_chunks(gen: _Generation, parsed: ParsedRequest, rid: str, model: str, tt: TokenText):
    created = int(time.time())

    def chunk(choices, **extra):
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if parsed.include_usage:
            obj["usage"] = None
        obj.update(extra)
        return _sse(obj)

    for c in gen.choices:
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    pending: dict[int, list] = {c.index: [] for c in gen.choices}
    while gen.remaining:
        choice, ev, delta = await gen.next()
        if ev.finished and ev.finish_reason not in ("stop", "length"):
            yield _sse(_failure(ev).body())
            yield "data: [DONE]\n\n"
            return
        lps = pending[choice.index]
        if parsed.logprobs and ev.logprob is not None and choice.counts_in_logprobs(ev):
            lps.append(chat_logprob_entry(tt, ev.token_id, ev.logprob, ev.top_logprobs, parsed.top_logprobs))
        if delta:
            yield chunk([{"index": choice.index, "delta": {"content": delta},
                          "logprobs": {"content": lps} if parsed.logprobs else None, "finish_reason": None}])
            pending[choice.index] = lps = []
        if ev.finished:
            yield chunk([{"index": choice.index, "delta": {},
                          "logprobs": {"content": lps} if parsed.logprobs and lps else None,
                          "finish_reason": ev.finish_reason}])
    if parsed.include_usage:
        yield chunk([], usage=gen.usage())
    yield "data: [DONE]\n\n"


async def _completion_chunks(gen: _Generation, parsed: ParsedRequest, rid: str, model: str, tt: TokenText):
    created = int(time.time())
    offsets = {c.index: 0 for c in gen.choices}
    pending: dict[int, list] = {c.index: [] for c in gen.choices}

    def chunk(choices, **extra):
        obj = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if parsed.include_usage:
            obj["usage"] = None
        obj.update(extra)
        return _sse(obj)

    def logprobs(i):
        if not parsed.logprobs:
            return None
        out = completion_logprobs(tt, pending[i], parsed.top_logprobs, offsets[i])
        offsets[i] += sum(len(t) for t in out["tokens"])
        pending[i] = []
        return out

    while gen.remaining:
        choice, ev, delta = await gen.next()
        if ev.finished and ev.finish_reason not in ("stop", "length"):
            yield _sse(_failure(ev).body())
            yield "data: [DONE]\n\n"
            return
        if ev.logprob is not None and choice.counts_in_logprobs(ev):
            pending[choice.index].append((ev.token_id, ev.logprob, ev.top_logprobs))
        if delta or ev.finished:
            yield chunk([{"index": choice.index, "text": delta, "logprobs": logprobs(choice.index),
                          "finish_reason": ev.finish_reason if ev.finished else None}])
    if parsed.include_usage:
        yield chunk([], usage=gen.usage())
    yield "data: [DONE]\n\n"


def _multipart(body: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    """(the uploaded file's bytes, the other form fields) of a multipart/form-data body (stdlib parser)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise bad_request("malformed multipart/form-data body")
    image, fields = None, {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if image is None and (part.get_filename() is not None or name in ("file", "image")):
            image = data
        elif name:
            fields[name] = data.decode("utf-8", "replace")
    if image is None:
        raise bad_request("the multipart body has no file (send the image in a 'file' field)", "file")
    return image, fields


# ---- running it ----------------------------------------------------------------------------------------------

class ServerThread:
    """Run an app with uvicorn in a background thread (tests, notebooks): `with ServerThread(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="nvlm-serve", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
