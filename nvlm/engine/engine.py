"""The serving engine: continuous batching over token ids, with vision and prefix caches.

Notable:
- Token ids in, token ids out: the tokenizer stays outside. Stop strings are the caller's business through a
  `should_stop(output_ids)` hook (the server runs a TextAssembler there).
- Each `step()`: drop cancelled requests (their slots are freed at once), admit waiting requests while a running
  slot is available (prefill one at a time, reusing the longest cached prefix), then one batched decode step for
  every running request. New requests join between decode steps; finished ones leave.
- Admission control: a request whose prompt + max_new_tokens exceeds the slot length is rejected at submit time;
  otherwise it waits in FIFO order until a slot frees up.
- Prefix reuse: a finished sequence keeps its slot (LRU) with the key of every cached position: the token id, or
  for image positions a key derived from the image's content key, so the same tokens over another image never
  match. A follow-up turn about the same image prefills only its new tokens. A prefix of a *running* sequence is
  copied into a fresh slot.
- Vision cache: image features by content key (+ tiling, part of the key the caller builds), LRU bounded in bytes.
- Greedy rows give the same tokens as `nvlm.generate` run alone (tests check this).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..generate import SamplingParams, apply_repetition_penalty, sample
from .kv import SlotPool


class RequestError(ValueError):
    """A request the engine cannot take (too long, bad parameters); the server maps it to a 4xx."""


@dataclass
class ImageInput:
    """One image of a prompt: `key` identifies its content + tiling; `pixels` gives (T, 3, S, S) on a cache miss."""

    key: str
    num_tokens: int  # T * tokens_per_tile: the `<|vision_pad|>` positions it fills
    pixels: Callable[[], torch.Tensor] | torch.Tensor


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None for a request that ended without a new token (cancelled / error)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    images: Sequence[ImageInput] = ()
    request_id: str = ""
    stop_ids: Sequence[int] | None = None
    on_event: Callable[[TokenEvent], None] | None = None
    should_stop: Callable[[list[int]], bool] | None = None
    # filled in by the engine
    output_ids: list[int] = field(default_factory=list)
    arrival: float = 0.0
    first_token_time: float | None = None
    last_token_time: float | None = None
    cached_tokens: int = 0


class _Slot:
    __slots__ = ("keys", "request", "last_used")

    def __init__(self):
        self.keys: list = []  # key of every position whose K/V is stored
        self.request: Request | None = None
        self.last_used = 0.0


class Histogram:
    """Prometheus-style cumulative histogram."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        self.sum += x
        self.count += 1
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1


@dataclass
class EngineStats:
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    prompt_tokens: int = 0
    prefix_cached_tokens: int = 0
    generated_tokens: int = 0
    vision_hits: int = 0
    vision_misses: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram([0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]))
    itl: Histogram = field(default_factory=lambda: Histogram([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]))


def image_key(data: bytes, *extra) -> str:
    """Content key for the vision cache: sha256 of the image bytes plus the tiling parameters."""
    h = hashlib.sha256(data)
    for e in extra:
        h.update(repr(e).encode())
    return h.hexdigest()


class VisionCache:
    """LRU map key -> image features (T, N, D), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> torch.Tensor | None:
        t = self.items.get(key)
        if t is not None:
            self.items.move_to_end(key)
        return t

    def put(self, key: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return
        if key in self.items:
            self.bytes -= self.items.pop(key).numel() * t.element_size()
        while self.items and self.bytes + size > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.items[key] = t
        self.bytes += size


class Engine:
    def __init__(self, model, *, vocab_limit: int, stop_ids: Sequence[int], max_batch: int = 16,
                 max_len: int | None = None, kv_cache_bytes: int | None = None, prefix_slots: int | None = None,
                 vision_cache_bytes: int = 1 << 30, kv_dtype: torch.dtype | None = None):
        self.model = model
        lm = model.language_model
        self.vocab_limit = vocab_limit
        self.stop_ids = tuple(stop_ids)
        self.max_len = min(max_len or lm.config.max_position_embeddings, lm.config.max_position_embeddings)
        dtype = kv_dtype or next(p for p in lm.parameters() if p.is_floating_point()).dtype
        per_slot = SlotPool.bytes_per_position(lm, dtype) * self.max_len
        if kv_cache_bytes is not None:
            slots = kv_cache_bytes // per_slot
            if slots < 1:
                raise ValueError(f"a KV budget of {kv_cache_bytes / 2**30:.2f} GiB holds no sequence of "
                                 f"{self.max_len} tokens ({per_slot / 2**30:.2f} GiB each); raise it or lower max_len")
            self.max_batch = min(max_batch, slots)
        else:
            self.max_batch = max_batch
            slots = max_batch + (max_batch if prefix_slots is None else prefix_slots)
        self.pool = SlotPool(lm, int(slots), self.max_len, dtype)
        self.slots = [_Slot() for _ in range(int(slots))]
        self.running = 0  # slots [0, running) hold running requests
        self.waiting: collections.deque[Request] = collections.deque()
        self.vision = VisionCache(vision_cache_bytes)
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._cancelled: set[str] = set()
        self._ids = itertools.count()
        self._gens: dict[str, torch.Generator] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self.device = model.embed_tokens.weight.device
        self.image_token_id = model.image_token_id
        self.tokens_per_tile = model.config.tokens_per_tile

    # ---- public API (thread-safe) --------------------------------------------------------------------------
    def submit(self, req: Request) -> str:
        if not req.prompt_ids:
            raise RequestError("the prompt is empty")
        need = len(req.prompt_ids) + req.params.max_new_tokens
        if need > self.max_len:
            self.stats.requests_rejected += 1
            raise RequestError(f"the prompt has {len(req.prompt_ids)} tokens; with max_tokens="
                               f"{req.params.max_new_tokens} it needs {need} positions but the context is "
                               f"{self.max_len}")
        n_pads = sum(1 for t in req.prompt_ids if t == self.image_token_id)
        if n_pads != sum(im.num_tokens for im in req.images):
            raise RequestError(f"the prompt has {n_pads} image positions but its images fill "
                               f"{sum(im.num_tokens for im in req.images)}")
        if any(t < 0 or t >= self.model.embed_tokens.num_embeddings for t in req.prompt_ids):
            raise RequestError("the prompt contains token ids outside the vocabulary")
        with self._lock:
            req.request_id = req.request_id or f"req-{next(self._ids)}"
            req.arrival = time.perf_counter()
            self.waiting.append(req)
            self._wake.notify()
        return req.request_id

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)
            self._wake.notify()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._cancelled)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return self.running

    def start(self) -> None:
        """Run the step loop in a background thread (the server's mode)."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="nvlm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.has_work():
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # never let the worker die: fail the running requests instead
                self._fail_all(f"{type(e).__name__}: {e}")

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    # ---- the step ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        self._apply_cancellations()
        while self.running < self.max_batch:
            with self._lock:
                if not self.waiting:
                    break
                req = self.waiting.popleft()
            try:
                self._admit(req)
            except Exception as e:
                self._emit(req, TokenEvent(req.request_id, None, finished=True, finish_reason="error",
                                           error=f"{type(e).__name__}: {e}"))
        if self.running:
            self._decode()

    def _emit(self, req: Request, ev: TokenEvent) -> None:
        if req.on_event is not None:
            try:
                req.on_event(ev)
            except Exception:  # a broken consumer must not take the engine down
                pass

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        dropped = []
        with self._lock:
            kept = collections.deque()
            for req in self.waiting:
                (dropped if req.request_id in cancelled else kept).append(req)
            self.waiting = kept
        for req in dropped:
            self.stats.requests_cancelled += 1
            self._emit(req, TokenEvent(req.request_id, None, finished=True, finish_reason="cancelled"))
        for i in reversed(range(self.running)):
            req = self.slots[i].request
            if req is not None and req.request_id in cancelled:
                self.stats.requests_cancelled += 1
                self._release(i, keep=False)
                self._emit(req, TokenEvent(req.request_id, None, finished=True, finish_reason="cancelled"))

    def _fail_all(self, message: str) -> None:
        for i in reversed(range(self.running)):
            req = self.slots[i].request
            self._release(i, keep=False)
            if req is not None:
                self._emit(req, TokenEvent(req.request_id, None, finished=True, finish_reason="error",
                                           error=message))

    # ---- slots ---------------------------------------------------------------------------------------------
    def _position_keys(self, req: Request) -> list:
        """Cache key of each prompt position: the token id, or (image key, index) for image positions."""
        keys: list = []
        images = iter(req.images)
        current, idx = None, 0
        for t in req.prompt_ids:
            if t == self.image_token_id:
                if current is None or idx >= current.num_tokens:
                    current, idx = next(images), 0
                keys.append((current.key, idx))
                idx += 1
            else:
                keys.append(t)
        return keys

    def _swap(self, i: int, j: int) -> None:
        if i == j:
            return
        used = max(len(self.slots[i].keys), len(self.slots[j].keys))
        self.pool.swap(i, j, used)
        self.slots[i], self.slots[j] = self.slots[j], self.slots[i]

    def _release(self, i: int, keep: bool) -> None:
        """Take running slot i out of the running range; keep its K/V for prefix reuse or drop it."""
        slot = self.slots[i]
        slot.request = None
        slot.last_used = time.perf_counter()
        if not keep:
            slot.keys = []
        last = self.running - 1
        self._swap(i, last)
        self.running -= 1

    @staticmethod
    def _common(a: list, b: list) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i

    def _choose_slot(self, keys: list) -> tuple[int, int]:
        """(slot index now at position `running`, number of reusable positions)."""
        limit = len(keys) - 1  # the last prompt token is always recomputed: its logits are needed
        best, best_len = None, 0
        for i, s in enumerate(self.slots):
            n = min(self._common(s.keys, keys), limit)
            if n > best_len:
                best, best_len = i, n
        target = self.running
        if best is not None and best >= self.running:  # an idle cached sequence: adopt it
            self._swap(best, target)
            return target, best_len
        # a free slot, else the least recently used cached one
        idle = range(self.running, len(self.slots))
        free = [i for i in idle if not self.slots[i].keys]
        pick = free[0] if free else min(idle, key=lambda i: self.slots[i].last_used)
        self._swap(pick, target)
        self.slots[target].keys = []
        if best is not None and best_len:  # a running sequence shares the prefix: copy it over
            self.pool.copy(best, target, best_len)
            self.slots[target].keys = list(self.slots[best].keys[:best_len])
            return target, best_len
        return target, 0

    # ---- prefill -------------------------------------------------------------------------------------------
    def _image_features(self, req: Request, first_pad: int) -> torch.Tensor | None:
        """Features for the image positions from pad number `first_pad` on, as (1, n, D)."""
        total = sum(im.num_tokens for im in req.images)
        if first_pad >= total:
            return None
        parts, start = [], 0
        for im in req.images:
            end = start + im.num_tokens
            if end > first_pad:
                feats = self.vision.get(im.key)
                if feats is None:
                    self.stats.vision_misses += 1
                    pixels = im.pixels() if callable(im.pixels) else im.pixels
                    dev = self.model.vision_model.embeddings.patch_embedding.weight.device
                    feats = self.model.extract_features(pixels.to(dev))
                    if feats.shape[0] * feats.shape[1] != im.num_tokens:
                        raise RequestError(f"image {im.key[:12]} gives {feats.shape[0] * feats.shape[1]} "
                                           f"embeddings for {im.num_tokens} positions")
                    self.vision.put(im.key, feats)
                else:
                    self.stats.vision_hits += 1
                flat = feats.reshape(-1, feats.shape[-1])
                parts.append(flat[max(first_pad - start, 0):])
            start = end
        return torch.cat(parts)[None]

    def _admit(self, req: Request) -> None:
        keys = self._position_keys(req)
        slot_idx, reuse = self._choose_slot(keys)
        slot = self.slots[slot_idx]
        slot.request = req
        self.running += 1
        if reuse:
            self.stats.prefix_hits += 1
        else:
            self.stats.prefix_misses += 1
        req.cached_tokens = reuse
        self.stats.prompt_tokens += len(keys)
        self.stats.prefix_cached_tokens += reuse
        try:
            ids = torch.tensor([req.prompt_ids[reuse:]], device=self.device)
            first_pad = sum(1 for t in req.prompt_ids[:reuse] if t == self.image_token_id)
            feats = self._image_features(req, first_pad)
            embeds = self.model.embed(ids, feats)
            T = ids.shape[1]
            positions = torch.arange(reuse, reuse + T, device=self.device)[None]
            mask = None
            if reuse:  # queries see the cached prefix plus the causal part of the new tokens
                mask = torch.ones(T, reuse + T, dtype=torch.bool, device=self.device).tril(reuse)[None, None]
            slot.keys = keys[:reuse]
            logits = self.model.language_model(embeds, positions, mask, self.pool.prefill_views(slot_idx),
                                               reuse, last_only=True)[0, -1]
            slot.keys = keys
        except Exception:
            self._release(slot_idx, keep=False)
            raise
        if req.params.temperature > 0:
            g = torch.Generator(device=self.device)
            g.manual_seed(req.params.seed if req.params.seed is not None else secrets.randbits(63))
            self._gens[req.request_id] = g
        self._accept(slot_idx, logits[None])

    # ---- decode --------------------------------------------------------------------------------------------
    def _decode(self) -> None:
        B = self.running
        reqs = [self.slots[i].request for i in range(B)]
        last = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)
        lengths = torch.tensor([len(self.slots[i].keys) for i in range(B)], device=self.device)
        L = int(lengths.max()) + 1
        mask = None
        if bool((lengths != lengths[0]).any()):
            mask = (torch.arange(L, device=self.device)[None] <= lengths[:, None])[:, None, None]
        embeds = self.model.embed_tokens(last)
        logits = self.model.language_model(embeds, lengths[:, None], mask, self.pool.decode_views(B, L),
                                           lengths)[:, -1]
        for i, r in enumerate(reqs):
            self.slots[i].keys.append(r.output_ids[-1])
        # _accept may release rows (swapping slots), so walk from the end
        for i in reversed(range(B)):
            self._accept(i, logits[i:i + 1])

    def _accept(self, slot_idx: int, logits: torch.Tensor) -> None:
        """Sample the next token of the request in `slot_idx` from its (1, V) logits; finish it if done."""
        req = self.slots[slot_idx].request
        p = req.params
        logits = logits[:, :self.vocab_limit].float()
        lp = logits.log_softmax(-1) if p.logprobs else None
        scores = logits
        if p.repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            ids = [t for t in req.prompt_ids + req.output_ids if t < self.vocab_limit]
            seen[0, ids] = True
            scores = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        tok = int(sample(scores, p, self._gens.get(req.request_id))[0])
        now = time.perf_counter()
        if req.first_token_time is None:
            req.first_token_time = now
            self.stats.ttft.observe(now - req.arrival)
        else:
            self.stats.itl.observe(now - req.last_token_time)
        req.last_token_time = now
        req.output_ids.append(tok)
        self.stats.generated_tokens += 1
        stop_ids = self.stop_ids if req.stop_ids is None else tuple(req.stop_ids)
        reason = None
        if tok in stop_ids:
            reason = "stop"
        elif req.should_stop is not None and req.should_stop(req.output_ids):
            reason = "stop"
        elif len(req.output_ids) >= p.max_new_tokens:
            reason = "length"
        top = None
        if lp is not None:
            vals, idx = lp[0].topk(min(p.logprobs, lp.shape[-1]))
            top = list(zip(idx.tolist(), vals.tolist()))
        ev = TokenEvent(req.request_id, tok, float(lp[0, tok]) if lp is not None else None, top,
                        finished=reason is not None, finish_reason=reason)
        if reason is not None:
            self.stats.requests_finished += 1
            self._gens.pop(req.request_id, None)
            self._release(slot_idx, keep=True)
        self._emit(req, ev)
