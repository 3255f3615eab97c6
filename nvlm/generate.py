"""Generation: prefill + cached decode, sampling, stops, streaming text, top-K logprobs, static left-padded batches.

Notable:
- Works on token ids; text enters only through `decode` (a callable) for stop strings and streaming.
- Greedy when temperature == 0; otherwise temperature -> top-k -> top-p, sampled with a seeded generator.
  Repetition penalty is HF's (divide positive logits, multiply negative ones, over prompt + output ids).
- Ids >= `vocab_limit` (the tokenizer's size; the embedding has unused padding rows) are never picked.
- Logprobs are log-softmax over the real vocabulary of the *raw* logits (before penalty/temperature/filters).
- Left padding: each row's positions start at 0 at its first real token, padded keys are masked out, and padded
  query rows attend to themselves only (a fully masked row would give NaNs).
- Streaming never splits a UTF-8 character (text ending in U+FFFD is held back) and never shows the start of a stop
  string that may still complete.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)


@dataclass
class Completion:
    token_ids: list[int]
    text: str = ""
    finish_reason: str = "length"  # "stop" (stop token or string) or "length"
    logprobs: list[list[tuple[int, float]]] | None = None  # per output token: top-K (id, logprob), descending
    token_logprobs: list[float] = field(default_factory=list)  # logprob of each chosen token


# ---- sampling ------------------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) float logits (already restricted) -> (B,) token ids."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always survives)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---- the token loop ------------------------------------------------------------------------------------------

def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, L - len(p):] = True
    return ids.to(device), valid.to(device)


@torch.inference_mode()
def generate_tokens(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                    stop_ids: Sequence[int], vocab_limit: int, image_features: torch.Tensor | None = None,
                    pad_id: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield, per decode step, (next ids (B,), raw log-probs (B, vocab_limit) or None).

    `image_features` holds all images of all prompts in prompt order: (n_tiles_total, tokens_per_tile, D).
    Stops when every row produced a stop id or after max_new_tokens; rows that finished keep yielding stop ids.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    lm = model.language_model
    device = model.embed_tokens.weight.device
    B = len(prompts)
    ids, valid = _left_pad(prompts, pad_id, device)
    L = ids.shape[1]
    total = L + params.max_new_tokens
    if total > lm.config.max_position_embeddings:
        raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                         f"context of {lm.config.max_position_embeddings} tokens")
    cache = lm.make_cache(B, total)
    padded = not bool(valid.all())
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    if padded:
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        mask = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device)[None]
        mask = mask[:, None]  # (B, 1, L, L)
        keys_valid = torch.cat([valid, torch.ones(B, params.max_new_tokens, dtype=torch.bool, device=device)], 1)
    else:
        mask = None
    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab_limit, dtype=torch.bool, device=device)
        seen.scatter_(1, ids.clamp(max=vocab_limit - 1), valid)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = positions[:, -1:] + 1  # (B, 1)

    embeds = model.embed(ids, image_features)
    logits = lm(embeds, positions, mask, cache, 0, last_only=True)[:, -1]
    for step in range(params.max_new_tokens):
        logits = logits[:, :vocab_limit].float().to(device)
        logprobs = logits.log_softmax(-1) if params.logprobs else None
        scores = apply_repetition_penalty(logits, seen, params.repetition_penalty) if seen is not None else logits
        tok = sample(scores, params, generator)
        tok = torch.where(done, stop[0] if len(stop) else tok, tok)
        if seen is not None:
            seen[torch.arange(B, device=device), tok] = True
        yield tok, logprobs
        done |= torch.isin(tok, stop)
        if bool(done.all()) or step == params.max_new_tokens - 1:
            return
        pos = L + step
        step_mask = keys_valid[:, None, None, :pos + 1] if padded else None
        logits = lm(model.embed_tokens(tok[:, None]), next_pos, step_mask, cache, pos)[:, -1]
        next_pos = next_pos + 1


# ---- text: stop strings and streaming ------------------------------------------------------------------------

class TextAssembler:
    """Turns one row's output ids into text: stop tokens, stop strings, UTF-8-safe streaming deltas."""

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Sequence[int], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop_ids = set(stop_ids)
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finished = False
        self.finish_reason = "length"

    def add(self, token_id: int) -> str:
        """Feed one id; returns the new text that is safe to show (may be "")."""
        if self.finished:
            return ""
        if token_id in self.stop_ids:
            self.finished, self.finish_reason = True, "stop"
            return self.flush()
        self.ids.append(token_id)
        text = self.decode(self.ids)
        for s in self.stop:
            cut = text.find(s)
            if cut != -1:
                self.text = text[:cut]
                self.finished, self.finish_reason = True, "stop"
                return self.flush()
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte(s)
            safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that could still become a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._emit(max(safe, self.emitted))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta

    def flush(self) -> str:
        return self._emit(len(self.text))


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *, decode: Callable[[list[int]], str],
             stop_ids: Sequence[int], vocab_limit: int, image_features: torch.Tensor | None = None,
             pad_id: int = 0) -> list[Completion]:
    """Batched generation; returns one Completion per prompt."""
    outs = [Completion(token_ids=[], logprobs=[] if params.logprobs else None) for _ in prompts]
    texts = [TextAssembler(decode, stop_ids, params.stop) for _ in prompts]
    for tok, logprobs in generate_tokens(model, prompts, params, stop_ids=stop_ids, vocab_limit=vocab_limit,
                                         image_features=image_features, pad_id=pad_id):
        toks = tok.tolist()
        top = None
        if logprobs is not None:
            k = min(params.logprobs, logprobs.shape[-1])
            vals, idx = logprobs.topk(k, dim=-1)
            chosen = logprobs.gather(1, tok[:, None]).squeeze(1).tolist()
            top = (vals.tolist(), idx.tolist())
        for i, t in enumerate(toks):
            if texts[i].finished:
                continue
            outs[i].token_ids.append(t)
            if top is not None:
                outs[i].logprobs.append(list(zip(top[1][i], top[0][i])))
                outs[i].token_logprobs.append(chosen[i])
            texts[i].add(t)
        if all(t.finished for t in texts):
            break
    for out, txt in zip(outs, texts):
        txt.flush()
        out.text, out.finish_reason = txt.text, txt.finish_reason
    return outs


def stream(model, prompt: Sequence[int], params: SamplingParams, *, decode: Callable[[list[int]], str],
           stop_ids: Sequence[int], vocab_limit: int, image_features: torch.Tensor | None = None) -> Iterator[str]:
    """Text deltas for one prompt; concatenated they equal `generate(...)[0].text`."""
    asm = TextAssembler(decode, stop_ids, params.stop)
    for tok, _ in generate_tokens(model, [prompt], params, stop_ids=stop_ids, vocab_limit=vocab_limit,
                                  image_features=image_features):
        delta = asm.add(int(tok[0]))
        if delta:
            yield delta
        if asm.finished:
            break
    tail = asm.flush()
    if tail:
        yield tail
