"""OpenAI request bodies -> prompt ids + engine images + sampling params; OpenAI-style errors and logprobs.

Notable:
- Nothing here knows about HTTP or asyncio: `parse_chat` / `parse_completion` take the decoded JSON body and return
  `GenSpec`s (prompt ids, `ImageInput`s, params) or raise `APIError`, which the app turns into
  `{"error": {"message", "type", "param", "code"}}` with its status. They block (image download/decode), so the app
  runs them in a worker thread.
- Known fields are type-checked strictly (`true` is not a number, `"0.5"` is not a float) and a wrong type is a 400
  naming the field; unknown fields are ignored, as OpenAI-compatible servers do.
- Image parts: each `image_url` part becomes one `<image>` placeholder. Like vLLM's chat path for NVLM-D, the
  placeholders of a message go first, one `<image>` line each, then the message's text parts joined by "\\n"; a
  text that already carries `<image>` placeholders keeps them (only the missing ones are prepended). This is the
  layout NVLM-D was trained on (SPEC 11.2) and what `nvlm.eval.endpoint` sends, so a request means the same here
  and on vLLM. Part order within a message is therefore not significant.
- Tiling is decided from the image size alone (`find_grid` + the thumbnail rule), so the prompt is built without
  preprocessing pixels; the pixels are made only if the engine's vision cache misses (`ImageInput.pixels`). The
  image is still fully decoded once here, so a truncated or corrupt image is a 400 now rather than a failure inside
  the engine. Its decoded size is remembered by content hash, so a repeated image is not decoded again.
- Image sources: `data:` URLs always; `file://` only under `--allowed-local-media-path` (after resolving symlinks);
  http(s) only with `--allow-remote-images` (urllib, a timeout, a byte cap, redirects only to http(s)).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import math
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..engine import ImageInput, image_key
from ..generate import SamplingParams
from ..image import DEFAULT_MAX_PIXELS, ImageError, find_grid, load_image, preprocess
from ..prompt import DEFAULT_SYSTEM, IMAGE_PLACEHOLDER, encode_conversation

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ServeOptions:
    """What the server accepts; the CLI flags map one to one."""

    model_name: str = "nvlm"
    api_key: str | None = None
    max_images: int = 8  # per request
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_tiles: int | None = None  # per image; None = the config's max_dynamic_patch. Also the default.
    allowed_local_media_path: str | None = None
    allow_remote_images: bool = False
    remote_timeout: float = 10.0
    max_image_bytes: int = 32 << 20  # per downloaded / read image
    max_request_bytes: int = 128 << 20
    default_max_tokens: int = 512
    max_n: int = 16
    max_top_logprobs: int = 20
    prompt_style: str = "megatron"


@dataclass
class GenSpec:
    """One prompt to run `n` times (choices), with everything the engine needs."""

    prompt_ids: list[int]
    images: list[ImageInput]
    params: SamplingParams  # seed is the first choice's; choice i gets seed + i
    n: int = 1
    ignore_eos: bool = False


@dataclass
class ParsedRequest:
    specs: list[GenSpec]
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # chat: report logprobs; completions: `top_logprobs` > 0 or logprobs == 0 given
    top_logprobs: int = 0


# ---- strict field access -------------------------------------------------------------------------------------

_MISSING = object()


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _field(body: dict, name: str, kind: str, default: Any = None, *, nullable: bool = True) -> Any:
    """body[name] checked against kind: "int", "number", "bool", "str", "list", "dict"."""
    v = body.get(name, _MISSING)
    if v is _MISSING or (v is None and nullable):
        return default
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": isinstance(v, bool), "str": isinstance(v, str), "list": isinstance(v, list),
          "dict": isinstance(v, dict)}[kind]
    if kind == "number" and ok and not math.isfinite(v):
        raise bad_request(f"'{name}' must be a finite number, got {v!r}", name)
    if not ok:
        want = {"int": "an integer", "number": "a number", "bool": "a boolean", "str": "a string",
                "list": "an array", "dict": "an object"}[kind]
        raise bad_request(f"'{name}' must be {want}, got {_type_name(v)} {_short(v)}", name)
    return v


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _check(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise bad_request(message, param)


# ---- sampling parameters (shared by both endpoints) ----------------------------------------------------------

def _sampling(body: dict, opts: ServeOptions, *, logprobs_k: int) -> tuple[SamplingParams, int, bool, int | None]:
    """-> (params without max_new_tokens fixed yet, n, ignore_eos, max_tokens or None)."""
    max_tokens = _field(body, "max_completion_tokens", "int")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", "int")
    _check(max_tokens is None or max_tokens >= 1, f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
    # Greedy by default (SPEC 11.5), unlike OpenAI's 1.0: NVLM-D was evaluated greedy.
    temperature = _field(body, "temperature", "number", 0.0)
    _check(temperature >= 0, f"'temperature' must be >= 0, got {temperature}", "temperature")
    top_p = _field(body, "top_p", "number", 1.0)
    _check(0 < top_p <= 1, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _field(body, "top_k", "int", 0)
    _check(top_k >= -1, f"'top_k' must be >= 0 (0 or -1 = off), got {top_k}", "top_k")
    rep = _field(body, "repetition_penalty", "number", 1.0)
    _check(rep > 0, f"'repetition_penalty' must be > 0, got {rep}", "repetition_penalty")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _field(body, name, "number", 0.0)
        _check(v == 0, f"'{name}' is not supported (only 0); use 'repetition_penalty'", name)
    seed = _field(body, "seed", "int")
    n = _field(body, "n", "int", 1)
    _check(1 <= n <= opts.max_n, f"'n' must be between 1 and {opts.max_n}, got {n}", "n")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise bad_request(f"'stop' must be a string or an array of strings, got {_type_name(stop)} {_short(stop)}",
                          "stop")
    _check(all(stop), "'stop' strings must not be empty", "stop")
    _check(len(stop) <= 16, f"at most 16 'stop' strings, got {len(stop)}", "stop")
    ignore_eos = _field(body, "ignore_eos", "bool", False)
    try:
        params = SamplingParams(max_new_tokens=max_tokens or 1, temperature=float(temperature), top_k=max(top_k, 0),
                                top_p=float(top_p), repetition_penalty=float(rep), seed=seed, stop=stop,
                                logprobs=logprobs_k)
    except ValueError as e:
        raise bad_request(str(e)) from None
    return params, n, ignore_eos, max_tokens


def _finish_spec(prompt_ids: list[int], images: list[ImageInput], params: SamplingParams, n: int, ignore_eos: bool,
                 max_tokens: int | None, max_len: int, opts: ServeOptions) -> GenSpec:
    """Fix max_new_tokens: the request's value (the engine rejects it if it does not fit) or the default, cut to
    what is left of the context."""
    if not prompt_ids:
        raise bad_request("the prompt is empty", "prompt")
    if max_tokens is None:
        room = max_len - len(prompt_ids)
        if room < 1:
            raise bad_request(f"the prompt has {len(prompt_ids)} tokens, which leaves no room to generate in the "
                              f"context of {max_len} tokens", "messages", "context_length_exceeded")
        max_tokens = min(opts.default_max_tokens, room)
    return GenSpec(prompt_ids, images, params.replace(max_new_tokens=max_tokens), n, ignore_eos)


def _max_tiles(body: dict, opts: ServeOptions, cfg) -> int:
    limit = opts.max_tiles or cfg.max_dynamic_patch
    v = _field(body, "max_tiles", "int", limit)
    _check(1 <= v <= limit, f"'max_tiles' must be between 1 and {limit} (the server's --max-tiles), got {v}",
           "max_tiles")
    return v


# ---- images --------------------------------------------------------------------------------------------------

class _RedirectHTTPOnly(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL refused: {newurl[:100]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_opener() -> urllib.request.OpenerDirector:
    # Only HTTP(S): the default opener would also follow file:// and ftp:// URLs.
    opener = urllib.request.OpenerDirector()
    for h in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
              _RedirectHTTPOnly(), urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(h)
    return opener


def _describe_url(url: str) -> str:
    return url[:60] + "..." if len(url) > 60 else url


def _decode_data_url(url: str, what: str) -> bytes:
    head, sep, data = url.partition(",")
    if not sep:
        raise bad_request(f"{what}: malformed data URL (no ',' after the media type)", "messages", "invalid_image_url")
    if head.endswith(";base64"):
        compact = re.sub(r"\s+", "", data)
        compact += "=" * (-len(compact) % 4)
        try:
            return base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"{what}: invalid base64 in the data URL ({e})", "messages",
                              "invalid_image_url") from None
    return urllib.parse.unquote_to_bytes(data)


def _read_file_url(url: str, opts: ServeOptions, what: str) -> bytes:
    if not opts.allowed_local_media_path:
        raise bad_request(f"{what}: file:// image URLs are disabled; start the server with "
                          "--allowed-local-media-path DIR to allow files under DIR", "messages", "invalid_image_url")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise bad_request(f"{what}: file:// URL with a remote host {parts.netloc!r}", "messages", "invalid_image_url")
    root = Path(opts.allowed_local_media_path).resolve()
    path = Path(urllib.parse.unquote(parts.path)).resolve()  # symlinks resolved before the check
    if not path.is_relative_to(root):
        raise bad_request(f"{what}: {str(path)!r} is outside the allowed local media path", "messages",
                          "invalid_image_url")
    if not path.is_file():
        raise bad_request(f"{what}: no such file {str(path)!r}", "messages", "invalid_image_url")
    size = path.stat().st_size
    if size > opts.max_image_bytes:
        raise bad_request(f"{what}: the file has {size:,} bytes, over the {opts.max_image_bytes:,}-byte limit",
                          "messages", "image_too_large")
    return path.read_bytes()


def _fetch_http(url: str, opts: ServeOptions, what: str) -> bytes:
    if not opts.allow_remote_images:
        raise bad_request(f"{what}: remote image URLs are disabled; send the image as a data: URL or start the "
                          "server with --allow-remote-images", "messages", "invalid_image_url")
    req = urllib.request.Request(url, headers={"User-Agent": "nvlm-serve"})
    try:
        with _http_opener().open(req, timeout=opts.remote_timeout) as resp:
            data = resp.read(opts.max_image_bytes + 1)
    except urllib.error.HTTPError as e:
        raise bad_request(f"{what}: fetching {_describe_url(url)} gave HTTP {e.code}", "messages",
                          "invalid_image_url") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise bad_request(f"{what}: cannot fetch {_describe_url(url)}: {reason}", "messages",
                          "invalid_image_url") from None
    if len(data) > opts.max_image_bytes:
        raise bad_request(f"{what}: the image at {_describe_url(url)} is over the {opts.max_image_bytes:,}-byte limit",
                          "messages", "image_too_large")
    return data


def read_image_url(url: str, opts: ServeOptions, what: str = "image") -> bytes:
    """The encoded bytes behind an image URL, under the server's policy."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _decode_data_url(url, what)
    if scheme == "file":
        return _read_file_url(url, opts, what)
    if scheme in ("http", "https"):
        return _fetch_http(url, opts, what)
    raise bad_request(f"{what}: unsupported image URL {_describe_url(url)!r}; use a data:, file:// or http(s) URL",
                      "messages", "invalid_image_url")


@dataclass(frozen=True)
class TileInfo:
    width: int
    height: int
    grid: tuple[int, int]  # (cols, rows)
    num_tiles: int  # thumbnail included


def tile_info(width: int, height: int, cfg, max_tiles: int) -> TileInfo:
    """The tiling `preprocess` will use, from the image size alone (SPEC 3: grid + thumbnail when > 1 tile)."""
    cols, rows = find_grid(width, height, min_num=min(cfg.min_dynamic_patch, max_tiles), max_num=max_tiles,
                           image_size=cfg.image_size)
    n = cols * rows
    return TileInfo(width, height, (cols, rows), n + (1 if cfg.use_thumbnail and n != 1 else 0))


class _SizeMemo:
    """sha256 of image bytes -> (width, height) of images that decoded fine (bounded, thread-safe)."""

    def __init__(self, size: int = 4096):
        self.size, self.items, self.lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, digest: str):
        with self.lock:
            v = self.items.get(digest)
            if v is not None:
                self.items.move_to_end(digest)
            return v

    def put(self, digest: str, wh: tuple[int, int]) -> None:
        with self.lock:
            self.items[digest] = wh
            if len(self.items) > self.size:
                self.items.popitem(last=False)


_sizes = _SizeMemo()


def decode_image(raw: bytes, opts: ServeOptions, what: str = "image") -> tuple[int, int, Image.Image | None]:
    """(width, height, decoded RGB image or None when this content decoded fine before). 400 on a bad image."""
    digest = hashlib.sha256(raw).hexdigest()
    wh = _sizes.get(digest)
    if wh is not None and wh[0] * wh[1] <= opts.max_image_pixels:
        return wh[0], wh[1], None
    if not raw:
        raise bad_request(f"{what}: the image is empty (0 bytes)", "messages", "invalid_image")
    try:
        img = load_image(raw, max_pixels=opts.max_image_pixels)
    except ImageError as e:
        code = "image_too_large" if "max_pixels" in str(e) or "too large" in str(e) else "invalid_image"
        raise bad_request(f"{what}: {e}", "messages", code) from None
    _sizes.put(digest, img.size)
    return img.width, img.height, img


def engine_image(raw: bytes, opts: ServeOptions, cfg, max_tiles: int,
                 what: str = "image") -> tuple[ImageInput, TileInfo]:
    """An engine `ImageInput` whose pixels are made only on a vision-cache miss."""
    w, h, img = decode_image(raw, opts, what)
    info = tile_info(w, h, cfg, max_tiles)
    min_tiles = min(cfg.min_dynamic_patch, max_tiles)
    source = img if img is not None else raw

    def pixels():
        return preprocess(source, max_tiles=max_tiles, min_tiles=min_tiles, image_size=cfg.image_size,
                          use_thumbnail=cfg.use_thumbnail).pixel_values

    key = image_key(raw, max_tiles, min_tiles, cfg.image_size, cfg.use_thumbnail)
    return ImageInput(key=key, num_tokens=info.num_tiles * cfg.tokens_per_tile, pixels=pixels), info


# ---- /v1/chat/completions ------------------------------------------------------------------------------------

def _image_part_url(part: dict, where: str) -> str:
    iu = part.get("image_url")
    if isinstance(iu, dict):
        url = iu.get("url")
    else:
        url = iu
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: an image_url part needs 'image_url': {{'url': string}}", "messages")
    return url


def parse_messages(raw: Any) -> tuple[list[dict], list[tuple[str, str]]]:
    """OpenAI messages -> ({"role", "content": str} with `<image>` placeholders, [(url, where)] in prompt order)."""
    if raw is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(raw, list):
        raise bad_request(f"'messages' must be an array, got {_type_name(raw)}", "messages")
    if not raw:
        raise bad_request("'messages' must not be empty", "messages")
    messages, urls = [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object, got {_type_name(m)}", "messages")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"{where}: role must be 'system', 'user' or 'assistant', got {_short(role)}", "messages")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            text, n_images = content, 0
        elif isinstance(content, list):
            texts, n_images = [], 0
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise bad_request(f"{pwhere}: a text part needs 'text': string", "messages")
                    texts.append(part["text"])
                elif kind == "image_url":
                    if role != "user":
                        raise bad_request(f"{pwhere}: images are only allowed in user messages", "messages")
                    urls.append((_image_part_url(part, pwhere), f"image {len(urls) + 1} ({pwhere})"))
                    n_images += 1
                else:
                    raise bad_request(f"{pwhere}: unsupported content part type {_short(kind)}; use 'text' or "
                                      "'image_url'", "messages")
            text = "\n".join(texts)
        else:
            raise bad_request(f"{where}: content must be a string or an array of parts, got {_type_name(content)}",
                              "messages")
        present = text.count(IMAGE_PLACEHOLDER)
        if n_images and present > n_images:
            raise bad_request(f"{where} has {present} {IMAGE_PLACEHOLDER} placeholders but {n_images} images",
                              "messages")
        if n_images > present:  # vLLM's rule: the missing placeholders go first, one line each
            text = "\n".join([IMAGE_PLACEHOLDER] * (n_images - present) + [text])
        messages.append({"role": role, "content": text})
    return messages, urls


def parse_chat(body: Any, pipe, opts: ServeOptions, max_len: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages, urls = parse_messages(body.get("messages"))
    _field(body, "model", "str")  # its value is checked by the app (404 for another model)
    logprobs = _field(body, "logprobs", "bool", False)
    top = _field(body, "top_logprobs", "int", 0)
    _check(0 <= top <= opts.max_top_logprobs, f"'top_logprobs' must be between 0 and {opts.max_top_logprobs}, "
           f"got {top}", "top_logprobs")
    _check(not top or logprobs, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params, n, ignore_eos, max_tokens = _sampling(body, opts, logprobs_k=max(top, 1) if logprobs else 0)
    stream, include_usage = _stream_fields(body)
    if _field(body, "tools", "list"):
        raise bad_request("tool calling is not supported", "tools")
    rf = _field(body, "response_format", "dict")
    if rf and rf.get("type") not in (None, "text"):
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    style = _field(body, "prompt_style", "str", opts.prompt_style)
    _check(style in ("megatron", "hf"), f"'prompt_style' must be 'megatron' or 'hf', got {style!r}", "prompt_style")

    cfg = pipe.config
    max_tiles = _max_tiles(body, opts, cfg)
    if len(urls) > opts.max_images:
        raise bad_request(f"too many images: {len(urls)} given, the limit is {opts.max_images} per request",
                          "messages", "too_many_images")
    images, tiles = [], []
    for url, what in urls:
        im, info = engine_image(read_image_url(url, opts, what), opts, cfg, max_tiles, what)
        images.append(im)
        tiles.append(info.num_tiles)
    try:
        enc = encode_conversation(pipe.tokenizer, messages, num_tiles=tiles, tokens_per_tile=cfg.tokens_per_tile,
                                  system=DEFAULT_SYSTEM, style=style)
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    spec = _finish_spec(enc.input_ids, images, params, n, ignore_eos, max_tokens, max_len, opts)
    return ParsedRequest([spec], stream, include_usage, logprobs, top)


def _stream_fields(body: dict) -> tuple[bool, bool]:
    stream = _field(body, "stream", "bool", False)
    so = _field(body, "stream_options", "dict", {})
    include_usage = so.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options")
    return stream, include_usage and stream


# ---- /v1/completions -----------------------------------------------------------------------------------------

def _prompts(raw: Any, tokenizer) -> list[list[int]]:
    def is_ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if raw is None:
        raise bad_request("'prompt' is required", "prompt")
    if isinstance(raw, str):
        items = [raw]
    elif is_ids(raw):
        items = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) or is_ids(x) for x in raw):
        items = raw
    else:
        raise bad_request("'prompt' must be a string, an array of strings, an array of token ids or an array of "
                          f"such arrays, got {_type_name(raw)} {_short(raw)}", "prompt")
    if len(items) > 64:
        raise bad_request(f"at most 64 prompts per request, got {len(items)}", "prompt")
    out = []
    for x in items:
        ids = tokenizer.encode(x) if isinstance(x, str) else list(x)
        if not ids:
            raise bad_request("a prompt is empty", "prompt")
        out.append(ids)
    return out


def parse_completion(body: Any, pipe, opts: ServeOptions, max_len: int) -> ParsedRequest:
    """Raw text in (no chat template), tokenized as is: special tokens written in the text become their ids."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    prompts = _prompts(body.get("prompt"), pipe.tokenizer)
    _field(body, "model", "str")
    k = _field(body, "logprobs", "int")
    _check(k is None or 0 <= k <= opts.max_top_logprobs, f"'logprobs' must be between 0 and "
           f"{opts.max_top_logprobs}, got {k}", "logprobs")
    if _field(body, "echo", "bool", False):
        raise bad_request("'echo' is not supported", "echo")
    if _field(body, "suffix", "str"):
        raise bad_request("'suffix' is not supported", "suffix")
    params, n, ignore_eos, max_tokens = _sampling(body, opts, logprobs_k=max(k, 1) if k is not None else 0)
    best_of = _field(body, "best_of", "int")
    _check(best_of is None or best_of == n, "'best_of' is not supported (it must equal 'n')", "best_of")
    stream, include_usage = _stream_fields(body)
    specs = [_finish_spec(ids, [], params, n, ignore_eos, max_tokens, max_len, opts) for ids in prompts]
    return ParsedRequest(specs, stream, include_usage, k is not None, k or 0)


# ---- logprobs ------------------------------------------------------------------------------------------------

@dataclass
class TokenText:
    """Token id -> (display string, raw bytes), for byte-level BPE vocabularies."""

    tokenizer: Any
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        from ..tokenizer import bytes_to_unicode

        self._byte = {c: b for b, c in bytes_to_unicode().items()}
        self._added = {i for i in self.tokenizer.backend.get_added_tokens_decoder()}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:  # an id past the tokenizer (cannot be sampled, but be safe)
            raw = b""
        elif token_id in self._added or any(c not in self._byte for c in piece):
            raw = piece.encode("utf-8")
        else:
            raw = bytes(self._byte[c] for c in piece)
        out = (raw.decode("utf-8", errors="replace"), list(raw))
        if len(self._cache) < 1 << 18:
            self._cache[token_id] = out
        return out


def chat_logprob_entry(tt: TokenText, token_id: int, logprob: float, top: Sequence[tuple[int, float]] | None,
                       k: int) -> dict:
    text, raw = tt(token_id)
    tops = []
    for i, lp in (top or [])[:k]:
        t, b = tt(i)
        tops.append({"token": t, "logprob": float(lp), "bytes": b})
    return {"token": text, "logprob": float(logprob), "bytes": raw, "top_logprobs": tops}


def completion_logprobs(tt: TokenText, entries: list[tuple[int, float, list | None]], k: int,
                        offset: int = 0) -> dict:
    """Legacy completions format: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, lp, top in entries:
        text, _ = tt(tok)
        out["tokens"].append(text)
        out["token_logprobs"].append(float(lp))
        out["top_logprobs"].append({tt(i)[0]: float(v) for i, v in (top or [])[:k]} if k else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
