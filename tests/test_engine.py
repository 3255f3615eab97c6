"""Engine: scheduling, admission, cancellation and stops on a mock model whose next token is always (t + 1) % V;
then on a tiny real checkpoint, continuous-batched outputs equal the same requests run alone and cache hits
give the outputs of cache misses."""

import threading

import pytest
import torch
from torch import nn

from nvlm.config import LLMConfig, preset
from nvlm.engine import Engine, ImageInput, Request, RequestError
from nvlm.generate import SamplingParams, generate
from nvlm.weights import random_model

V = 100


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(4)  # the pool reads dtype/device from here


class MockLM(nn.Module):
    """Writes each token id into its KV slot (so tests can read the cache) and predicts (t + 1) % V."""

    def __init__(self):
        super().__init__()
        self.config = LLMConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                intermediate_size=4, vocab_size=V, max_position_embeddings=64)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Layer()])
        self.forward_tokens = []  # how many tokens each forward call processed

    def forward(self, embeds, positions, mask, cache, cache_pos, last_only=False):
        tokens = embeds[..., 0].round().long()  # (B, T)
        B, T = tokens.shape
        self.forward_tokens.append(B * T)
        kv = tokens[:, None, :, None].float().expand(B, 1, T, 1)
        cache[0].update(cache_pos, kv, kv)
        nxt = (tokens + 1) % V
        if last_only:
            nxt = nxt[:, -1:]
        return torch.nn.functional.one_hot(nxt, V).float() * 10


class MockModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.language_model = MockLM()
        self.embed_tokens = nn.Embedding(V, 4)
        with torch.no_grad():
            self.embed_tokens.weight.zero_()
            self.embed_tokens.weight[:, 0] = torch.arange(V).float()
        self.image_token_id = 99
        self.config = preset("tiny", vocab_size=V)
        self.vision_model = nn.Module()
        self.vision_model.embeddings = nn.Module()
        self.vision_model.embeddings.patch_embedding = nn.Conv2d(3, 1, 1)

    def embed(self, ids, feats=None):
        return self.embed_tokens(ids)


def mock_engine(**kw):
    return Engine(MockModel(), vocab_limit=V, stop_ids=[0], **kw)


def collect(engine, *reqs):
    events = {}
    for r in reqs:
        r.on_event = lambda ev, store=events: store.setdefault(ev.request_id, []).append(ev)
        engine.submit(r)
    return events


def test_single_request_counts_up_to_max_tokens():
    e = mock_engine(max_len=32)
    req = Request([5, 6, 7], SamplingParams(max_new_tokens=4))
    ev = collect(e, req)
    e.run_until_done()
    assert req.output_ids == [8, 9, 10, 11]
    assert ev[req.request_id][-1].finish_reason == "length" and ev[req.request_id][-1].finished
    assert e.num_running == 0


def test_stop_id_and_stop_hook():
    e = mock_engine(max_len=32)
    a = Request([97], SamplingParams(max_new_tokens=10))  # 98, 99, 0 (stop id)
    b = Request([10], SamplingParams(max_new_tokens=10), should_stop=lambda out: out[-1] == 13)
    ev = collect(e, a, b)
    e.run_until_done()
    assert a.output_ids == [98, 99, 0] and ev[a.request_id][-1].finish_reason == "stop"
    assert b.output_ids == [11, 12, 13] and ev[b.request_id][-1].finish_reason == "stop"


def test_continuous_batching_admits_between_decode_steps():
    e = mock_engine(max_batch=2, max_len=32)
    reqs = [Request([10 * i + 1], SamplingParams(max_new_tokens=n)) for i, n in enumerate([2, 6, 3])]
    collect(e, *reqs)
    e.step()  # admits two (each gets its first token at prefill), one decode step
    assert e.num_running == 1 and e.queue_depth == 1  # the 2-token request finished, the third waits
    e.step()  # the third joins, then a decode step for both
    assert e.num_running == 2 and e.queue_depth == 0
    e.run_until_done()
    assert [r.output_ids for r in reqs] == [[2, 3], [12, 13, 14, 15, 16, 17], [22, 23, 24]]


def test_admission_control_rejects_too_long_prompts():
    e = mock_engine(max_len=8)
    with pytest.raises(RequestError, match="context is 8"):
        e.submit(Request([1] * 6, SamplingParams(max_new_tokens=3)))
    with pytest.raises(RequestError, match="empty"):
        e.submit(Request([], SamplingParams()))
    with pytest.raises(RequestError, match="image positions"):
        e.submit(Request([1, 99, 99], SamplingParams(max_new_tokens=1)))


def test_kv_budget_limits_the_batch():
    per_slot = 2 * 1 * 1 * 4 * 4 * 16  # k+v, 1 layer, 1 head, head_dim 4, fp32, 16 positions
    e = mock_engine(max_batch=8, max_len=16, kv_cache_bytes=3 * per_slot)
    assert e.max_batch == 3
    with pytest.raises(ValueError, match="holds no sequence"):
        mock_engine(max_len=16, kv_cache_bytes=per_slot - 1)


def test_cancellation_frees_the_slot_at_once():
    e = mock_engine(max_batch=2, max_len=64)
    a = Request([1], SamplingParams(max_new_tokens=50))
    b = Request([40], SamplingParams(max_new_tokens=50))
    c = Request([70], SamplingParams(max_new_tokens=2))
    ev = collect(e, a, b, c)
    e.step()
    e.cancel(a.request_id)
    e.cancel(c.request_id)  # still waiting
    e.step()
    assert ev[a.request_id][-1].finish_reason == "cancelled" and ev[c.request_id][-1].finish_reason == "cancelled"
    assert e.num_running == 1 and e.queue_depth == 0
    assert all(s.request is None or s.request is b for s in e.slots)
    assert sum(1 for s in e.slots if s.keys and s.request is None) == 0  # a cancelled sequence is not kept
    e.cancel(b.request_id)
    e.run_until_done()
    assert e.num_running == 0 and all(s.request is None for s in e.slots)


def test_prefix_reuse_prefills_only_new_tokens():
    e = mock_engine(max_len=64)
    a = Request([3, 4, 5, 6], SamplingParams(max_new_tokens=3))
    collect(e, a)
    e.run_until_done()
    assert a.output_ids == [7, 8, 9]
    lm = e.model.language_model
    lm.forward_tokens.clear()
    follow = [3, 4, 5, 6, 7, 8, 9, 50, 51]
    b = Request(follow, SamplingParams(max_new_tokens=2))
    collect(e, b)
    e.run_until_done()
    # positions 0..5 (prompt + the two fed-back outputs) were cached; 9 (not fed back) onwards are recomputed
    assert b.cached_tokens == 6 and lm.forward_tokens[0] == len(follow) - 6
    assert b.output_ids == [52, 53]
    slot = next(s for s in e.slots if s.keys[:len(follow)] == follow)
    k = e.pool.k[0][e.slots.index(slot), 0, :len(follow), 0]
    assert k.tolist() == [float(t) for t in follow]
    assert e.stats.prefix_hits == 1


def test_background_thread_serves_concurrent_submitters():
    e = mock_engine(max_batch=4, max_len=64)
    e.start()
    try:
        done = {}
        finished = threading.Event()

        def on_event(ev):
            if ev.finished:
                done[ev.request_id] = ev.finish_reason
                if len(done) == 8:
                    finished.set()

        reqs = [Request([i], SamplingParams(max_new_tokens=5), on_event=on_event) for i in range(1, 9)]
        threads = [threading.Thread(target=e.submit, args=(r,)) for r in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert finished.wait(30)
        assert all(r.output_ids == [(r.prompt_ids[0] + k) % V for k in range(1, 6)] for r in reqs)
    finally:
        e.shutdown()


# ---- a tiny real checkpoint ----------------------------------------------------------------------------------

VOCAB, LIMIT = 320, 300


@pytest.fixture(scope="module")
def tiny():
    m = random_model(preset("tiny", vocab_size=VOCAB), seed=11, std=0.2)
    m.image_token_id = 299
    return m


def _alone(model, prompt, feats=None, n=8):
    return generate(model, [prompt], SamplingParams(max_new_tokens=n), decode=lambda ids: "", stop_ids=[290],
                    vocab_limit=LIMIT, image_features=feats)[0].token_ids


def _image(seed, tiles=3):
    pv = torch.randn(tiles, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    return pv, ImageInput(key=f"img{seed}", num_tokens=tiles * 4, pixels=pv)


def test_batched_outputs_equal_requests_run_alone(tiny):
    pv, im = _image(1)
    prompts = [([5, 6, 7] + [299] * 12 + [8, 9], [im]), ([11, 12], []), ([3] * 9, []),
               ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [])]
    e = Engine(tiny, vocab_limit=LIMIT, stop_ids=[290], max_batch=3, max_len=64)
    reqs = [Request(p, SamplingParams(max_new_tokens=8), images=ims) for p, ims in prompts]
    collect(e, *reqs[:2])
    e.step()
    e.step()
    collect(e, *reqs[2:])  # join a running batch mid-flight
    e.run_until_done()
    for (p, ims), r in zip(prompts, reqs):
        feats = tiny.extract_features(pv) if ims else None
        assert r.output_ids == _alone(tiny, p, feats), p


def test_prefix_and_vision_cache_hits_match_misses(tiny):
    pv, im = _image(2)
    first = [5] + [299] * 12 + [7, 8]
    e = Engine(tiny, vocab_limit=LIMIT, stop_ids=[290], max_batch=2, max_len=96)
    a = Request(first, SamplingParams(max_new_tokens=6), images=[im])
    collect(e, a)
    e.run_until_done()
    follow = first + a.output_ids + [20, 21, 22]
    b = Request(follow, SamplingParams(max_new_tokens=6, logprobs=2), images=[im])
    evs = collect(e, b)
    e.run_until_done()
    assert b.cached_tokens == len(first) + len(a.output_ids) - 1
    assert e.stats.vision_misses == 1  # the follow-up needed no image features at all
    fresh = Engine(tiny, vocab_limit=LIMIT, stop_ids=[290], max_batch=2, max_len=96)
    c = Request(follow, SamplingParams(max_new_tokens=6, logprobs=2), images=[im])
    evc = collect(fresh, c)
    fresh.run_until_done()
    assert b.output_ids == c.output_ids
    for x, y in zip(evs[b.request_id], evc[c.request_id]):
        assert abs(x.logprob - y.logprob) < 1e-4
    # same image in a new conversation: a vision-cache hit, identical output
    d = Request([9] + [299] * 12 + [4], SamplingParams(max_new_tokens=5), images=[im])
    collect(e, d)
    e.run_until_done()
    assert e.stats.vision_hits == 1
    assert d.output_ids == _alone(tiny, d.prompt_ids, tiny.extract_features(pv), n=5)
