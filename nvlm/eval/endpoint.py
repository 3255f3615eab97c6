"""A small OpenAI-compatible chat client (stdlib only) for evaluating a model behind a server (vLLM, `nvlm serve`).

Notable:
- One POST to `{url}/v1/chat/completions` per sample. `url` may be the server root, `.../v1`, or the full
  `.../v1/chat/completions` address.
- The user turn is a list of content parts: one `image_url` part per image (a base64 `data:` URL) **first**, then
  one `text` part with the `<image>` placeholders (and the newline after each) removed. vLLM's NVLM-D chat path
  puts one `<image>` line per image in front of the text, which is the layout the model was trained with; placing
  the images first here keeps the request meaning the same on servers that honour part order.
- Greedy: `temperature: 0` and an explicit `top_p: 1.0`, because vLLM NVLM-D servers pick up the checkpoint's
  leaked `top_p: 0` default otherwise (SPEC §4.4). `max_tokens` is the sample's budget.
- Connection errors, timeouts, 408/429 and 5xx are retried with exponential backoff (a numeric `Retry-After`
  header is honoured, capped); any other 4xx fails at once with the server's own error message.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class EndpointError(RuntimeError):
    """The server refused a request (4xx), answered something unreadable, or stayed unreachable after retries."""


def _sniff_mime(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    return None


def image_data_url(image) -> str:
    """A `data:` URL for a path, raw bytes or a PIL image. PNG/JPEG/GIF/WebP/BMP bytes pass through unchanged;
    anything else is re-encoded as PNG through PIL."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        with open(image, "rb") as f:
            data = f.read()
    mime = _sniff_mime(data)
    if mime is None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad input
            raise ValueError(f"cannot read image {_describe(image)}: {exc}") from None
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _describe(image) -> str:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    return repr(str(image)) if not hasattr(image, "mode") else "<PIL image>"


def strip_placeholders(prompt: str) -> str:
    """The prompt with every `<image>` (and one newline right after it) removed, leading whitespace stripped."""
    return prompt.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").lstrip()


def build_messages(prompt: str, images: Sequence = (), system: str | None = None) -> list[dict]:
    """OpenAI chat messages: optional system turn, then a user turn of image parts followed by the text."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count and count != len(images):
        raise ValueError(f"the prompt has {count} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images were given")
    messages = [{"role": "system", "content": system}] if system else []
    if not images:
        messages.append({"role": "user", "content": prompt})
        return messages
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
    parts.append({"type": "text", "text": strip_placeholders(prompt)})
    messages.append({"role": "user", "content": parts})
    return messages


def chat_completions_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def _server_message(body: bytes) -> str:
    """The error text a server put in its body: OpenAI `{"error": {"message"}}`, FastAPI `{"detail"}`, or raw."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if obj.get(key):
                return str(obj[key]) if not isinstance(obj[key], (dict, list)) else json.dumps(obj[key])
    return text[:500]


@dataclass
class ChatClient:
    """A chat-completions client. `complete()` is thread-safe (every call opens its own connection)."""

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 600.0
    retries: int = 3  # extra attempts after the first
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    max_backoff: float = 60.0

    def __post_init__(self):
        if not self.model:
            raise ValueError("an endpoint needs a model name (--api-model), as the server lists it at /v1/models")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        self.endpoint = chat_completions_url(self.url)
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint URL must start with http:// or https://, got {self.url!r}")

    def payload(self, prompt: str, images: Sequence = (), *, system: str | None = None,
                max_tokens: int = 128) -> dict:
        return {"model": self.model, "messages": build_messages(prompt, images, system),
                "temperature": 0, "top_p": 1.0, "max_tokens": int(max_tokens)}

    def complete(self, prompt: str, images: Sequence = (), *, system: str | None = None, max_tokens: int = 128) -> str:
        """The assistant's text for one prompt (greedy)."""
        body = self.payload(prompt, images, system=system, max_tokens=max_tokens)
        response = self.post(body)
        try:
            content = response["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.endpoint}: unexpected response shape: {json.dumps(response)[:300]}") from None
        return content or ""  # a null content (nothing generated) is an empty answer, scored as such

    def post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            delay = min(self.backoff * 2 ** attempt, self.max_backoff)
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                message = _server_message(exc.read() or b"")
                if exc.code not in RETRY_STATUS:
                    raise EndpointError(f"{self.endpoint}: HTTP {exc.code}: {message}") from None
                last = f"HTTP {exc.code}: {message}"
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if retry_after and retry_after.strip().isdigit():
                    delay = min(float(retry_after), self.max_backoff)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                    TimeoutError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
            else:
                try:
                    obj = json.loads(raw)
                except ValueError:
                    raise EndpointError(f"{self.endpoint}: response is not JSON: {raw[:200]!r}") from None
                if not isinstance(obj, dict):
                    raise EndpointError(f"{self.endpoint}: response is not a JSON object: {raw[:200]!r}")
                return obj
            if attempt < self.retries:
                time.sleep(delay)
        raise EndpointError(f"{self.endpoint}: gave up after {self.retries + 1} attempts; last error: {last}")
