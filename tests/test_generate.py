"""Generation loop: cached greedy == uncached argmax, batching == single runs, sampling, stops, streaming, logprobs."""

import math

import pytest
import torch

from nvlm.config import preset
from nvlm.generate import (SamplingParams, TextAssembler, apply_repetition_penalty, generate, generate_tokens,
                           sample, stream)
from nvlm.weights import random_model

VOCAB, LIMIT, STOP = 320, 300, 290  # embedding rows, "tokenizer size", stop id


@pytest.fixture(scope="module")
def model():
    m = random_model(preset("tiny", vocab_size=VOCAB), seed=5, std=0.2)  # large std: peaky, varied argmaxes
    m.image_token_id = 299
    return m


def byte_decode(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def run(model, prompts, **kw):
    params = SamplingParams(**{"max_new_tokens": 12, **kw})
    return generate(model, prompts, params, decode=byte_decode, stop_ids=[STOP], vocab_limit=LIMIT)


def reference_greedy(model, prompt, n):
    """Argmax over the full (uncached) forward pass, re-run from scratch for every token."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1, :LIMIT]
        t = int(logits.argmax())
        out.append(t)
        if t == STOP:
            break
        ids.append(t)
    return out


PROMPTS = [[5, 17, 33, 2, 9, 100, 42], [7, 8], [250, 1, 3, 3, 3, 60, 61, 62, 63, 64, 65]]


def test_cached_greedy_equals_uncached_argmax(model):
    for p in PROMPTS:
        assert run(model, [p])[0].token_ids == reference_greedy(model, p, 12)


def test_left_padded_batch_equals_single_runs(model):
    batch = run(model, PROMPTS, logprobs=3)
    for p, b in zip(PROMPTS, batch):
        single = run(model, [p], logprobs=3)[0]
        assert b.token_ids == single.token_ids
        for x, y in zip(b.logprobs, single.logprobs):
            assert [i for i, _ in x] == [i for i, _ in y]
            assert all(abs(u - v) < 1e-4 for (_, u), (_, v) in zip(x, y))


def test_logprobs_are_sorted_log_softmax_over_the_vocabulary(model):
    p = PROMPTS[0]
    out = run(model, [p], logprobs=4, max_new_tokens=1)[0]
    with torch.no_grad():
        ref = model(torch.tensor([p]))[0, -1, :LIMIT].log_softmax(-1)
    top = out.logprobs[0]
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    vals, idx = ref.topk(4)
    assert [i for i, _ in top] == idx.tolist()
    assert all(abs(lp - v) < 1e-5 for (_, lp), v in zip(top, vals.tolist()))
    assert top[0][0] == out.token_ids[0]  # greedy picks the top logprob


def test_ids_beyond_the_tokenizer_are_never_sampled(model):
    with torch.no_grad():
        model.language_model.lm_head.weight[LIMIT:] = 10.0  # padding rows would win every argmax
    try:
        for kw in ({}, {"temperature": 1.5, "seed": 0}, {"temperature": 1.0, "top_k": 50, "seed": 1}):
            out = run(model, PROMPTS, max_new_tokens=20, **kw)
            assert all(t < LIMIT for o in out for t in o.token_ids)
    finally:
        with torch.no_grad():
            model.language_model.lm_head.weight[LIMIT:] = 0.0


def test_sampling_is_seeded(model):
    a = run(model, [PROMPTS[0]], temperature=1.0, seed=123, max_new_tokens=20)[0].token_ids
    b = run(model, [PROMPTS[0]], temperature=1.0, seed=123, max_new_tokens=20)[0].token_ids
    c = run(model, [PROMPTS[0]], temperature=1.0, seed=124, max_new_tokens=20)[0].token_ids
    assert a == b and a != c
    # top_k = 1 is greedy whatever the temperature
    assert run(model, [PROMPTS[1]], temperature=2.0, top_k=1, seed=9)[0].token_ids == run(model, [PROMPTS[1]])[0].token_ids


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=0.6)  # 0.5 < 0.6, so tokens 0 and 1 stay
    seen = {int(sample(logits, params, g)) for _ in range(300)}
    assert seen == {0, 1}
    params = SamplingParams(temperature=1.0, top_p=0.5)  # token 0 alone reaches 0.5
    assert {int(sample(logits, params, g)) for _ in range(100)} == {0}


def test_repetition_penalty_matches_hf_rule():
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0]]


def test_stop_token_ends_generation_and_is_reported(model):
    params = SamplingParams(max_new_tokens=12)
    free = generate(model, [PROMPTS[0]], params, decode=byte_decode, stop_ids=[], vocab_limit=LIMIT)[0]
    k = next(i for i in range(1, 12) if free.token_ids[i] not in free.token_ids[:i])
    stop = free.token_ids[k]
    out = generate(model, [PROMPTS[0]], params, decode=byte_decode, stop_ids=[stop], vocab_limit=LIMIT)[0]
    assert out.token_ids == free.token_ids[:k + 1] and out.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.token_ids) == 12


def test_stream_deltas_concatenate_to_generate_text(model):
    for p in PROMPTS:
        params = SamplingParams(max_new_tokens=16)
        full = generate(model, [p], params, decode=byte_decode, stop_ids=[STOP], vocab_limit=LIMIT)[0].text
        deltas = list(stream(model, p, params, decode=byte_decode, stop_ids=[STOP], vocab_limit=LIMIT))
        assert "".join(deltas) == full


# ---- text assembly: UTF-8 and stop strings -------------------------------------------------------------------

def test_streaming_never_splits_a_utf8_character():
    asm = TextAssembler(byte_decode, stop_ids=[STOP])
    e_acute = list("é".encode())  # 2 bytes
    euro = list("€".encode())  # 3 bytes
    deltas = [asm.add(b) for b in [ord("a")] + e_acute + euro + [ord("b")]]
    assert deltas == ["a", "", "é", "", "", "€", "b"]
    assert asm.add(STOP) == "" and asm.finished and asm.finish_reason == "stop" and asm.text == "aé€b"


def test_stop_strings_are_held_back_and_cut():
    asm = TextAssembler(byte_decode, stop_ids=[STOP], stop=["END"])
    out = [asm.add(ord(c)) for c in "abEN"]
    assert out == ["a", "b", "", ""]  # "EN" might become "END"
    assert asm.add(ord("D")) == "" and asm.finished and asm.text == "ab"
    asm = TextAssembler(byte_decode, stop_ids=[STOP], stop=["END"])
    out = [asm.add(ord(c)) for c in "aEx"]
    assert "".join(out) == "aEx"  # "E" was released once "x" ruled the stop string out


def test_invalid_sampling_params_are_named():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_context_overflow_is_an_error(model):
    params = SamplingParams(max_new_tokens=5000)
    with pytest.raises(ValueError, match="context"):
        next(generate_tokens(model, [[1, 2]], params, stop_ids=[STOP], vocab_limit=LIMIT))


def test_gemv_transform_matches_linear():
    from nvlm.fast import GemvLinear, use_gemv

    m = random_model(preset("tiny", vocab_size=VOCAB), seed=2)
    m.image_token_id = 310  # beyond LIMIT: never generated
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = m(ids)
    use_gemv(m)
    assert all(type(x) is not torch.nn.Linear for x in m.language_model.modules())
    assert isinstance(m.language_model.lm_head, GemvLinear)
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref)  # multi-row: the F.linear path
        lin = m.language_model.model.layers[0].self_attn.q_proj  # has a bias
        x = torch.randn(1, 1, lin.in_features)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
    out = run(m, PROMPTS[:1])[0].token_ids
    assert out == reference_greedy(m, PROMPTS[0], 12)
