"""nvlm.prompt: golden NVLM-D prompt ids (Megatron training format and the HF remote-code format).

The word ids below are checked against a pure-Python rank-BPE over qwen.tiktoken in test_tokenizer.py.
"""

from __future__ import annotations

import pytest

from nvlm.prompt import DEFAULT_SYSTEM, encode_conversation, tile_tags
from nvlm.tokenizer import build_byte_tokenizer

S, E, NL, P = 151644, 151645, 198, 151654  # <|im_start|> <|im_end|> "\n" <|vision_pad|>
SYSTEM, USER, ASSISTANT = 8948, 872, 77091
ANSWER_THE_QUESTIONS = [16141, 279, 4755, 13]
WHAT_IS_THIS = [3838, 374, 419, 30]
A_CAT = [32, 8251, 13]
HI = [13048]
DESCRIBE_BOTH = [74785, 2176, 13]
TAG = {1: [27, 21094, 62, 16, 29], 2: [27, 21094, 62, 17, 29]}
THUMB = [27, 21094, 19296, 37824, 29]
IMAGE_OPEN = [46465, 29]  # "<Image" ">" after a newline
IMAGE_CLOSE_NL = [522, 1906, 397]  # "</" "Image" ">\n"

SYS_TURN = [S, SYSTEM, NL, *ANSWER_THE_QUESTIONS, E, NL]
GEN = [S, ASSISTANT, NL]


def pads(n: int) -> list[int]:
    return [P] * n


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def test_tile_tags():
    assert tile_tags(1) == ["<tile_global_thumbnail>"]
    assert tile_tags(3) == ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]
    assert tile_tags(7) == [f"<tile_{k}>" for k in range(1, 7)] + ["<tile_global_thumbnail>"]
    with pytest.raises(ValueError):
        tile_tags(0)


def test_single_image_megatron(qwen_tokenizer):
    # One image of 2x1 tiles + thumbnail, 4 tokens per tile (256 in the real model).
    out = encode_conversation(qwen_tokenizer, [user("What is this?")], num_tiles=[3], tokens_per_tile=4)
    assert out.input_ids == [
        *SYS_TURN,
        S, USER, NL, *IMAGE_OPEN,
        *TAG[1], *pads(4), *TAG[2], *pads(4), *THUMB, *pads(4),
        *IMAGE_CLOSE_NL, *WHAT_IS_THIS, E, NL,
        *GEN,
    ]
    block = "<tile_1>" + "<|vision_pad|>" * 4 + "<tile_2>" + "<|vision_pad|>" * 4 + "<tile_global_thumbnail>" + "<|vision_pad|>" * 4
    assert out.text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>\n"
        f"<|im_start|>user\n<Image>{block}</Image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out.supervised == [False] * len(out.input_ids)
    # Encoding the text in one go would fuse "><" (1784): the reason megatron tokenizes run by run.
    assert qwen_tokenizer.encode(out.text) != out.input_ids


def test_without_tile_tags_the_tiles_follow_each_other(qwen_tokenizer):
    """The ablation prompt (tile_tags=False): the same block with the tags removed, pads unchanged."""
    out = encode_conversation(qwen_tokenizer, [user("What is this?")], num_tiles=[3], tokens_per_tile=4,
                              tile_tags=False)
    assert out.input_ids == [
        *SYS_TURN,
        S, USER, NL, *IMAGE_OPEN, *pads(12), *IMAGE_CLOSE_NL, *WHAT_IS_THIS, E, NL,
        *GEN,
    ]
    assert out.text == ("<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n<Image>"
                        + "<|vision_pad|>" * 12 + "</Image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")


def test_single_image_hf_style(qwen_tokenizer):
    out = encode_conversation(qwen_tokenizer, [user("What is this?")], num_tiles=[3], tokens_per_tile=4, style="hf")
    assert out.input_ids == [
        S, SYSTEM, NL, *ANSWER_THE_QUESTIONS, E,
        S, USER, NL, 46465, 1784, 21094, 62, 16, 29, *pads(4), *TAG[2], *pads(4), *THUMB, *pads(4),
        *IMAGE_CLOSE_NL, *WHAT_IS_THIS, E,
        *GEN,
    ]
    assert out.input_ids == qwen_tokenizer.encode(out.text)
    assert out.text.startswith("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<Image><tile_1>")
    megatron = encode_conversation(qwen_tokenizer, [user("What is this?")], num_tiles=[3], tokens_per_tile=4)
    assert len(megatron.input_ids) == len(out.input_ids) + 3  # two "\n" after <|im_end|>, and "><" split in two


def test_text_only(qwen_tokenizer):
    out = encode_conversation(qwen_tokenizer, [user("What is this?")], tokens_per_tile=256)
    assert out.input_ids == [*SYS_TURN, S, USER, NL, *WHAT_IS_THIS, E, NL, *GEN]
    assert out.input_ids == qwen_tokenizer.encode(out.text)
    no_gen = encode_conversation(qwen_tokenizer, [user("What is this?")], tokens_per_tile=256, add_generation_prompt=False)
    assert no_gen.input_ids == out.input_ids[:-3]


@pytest.mark.parametrize("system", ["", None])
def test_empty_system_omits_turn(qwen_tokenizer, system):
    out = encode_conversation(qwen_tokenizer, [user("Hi")], tokens_per_tile=4, system=system)
    assert out.input_ids == [S, USER, NL, *HI, E, NL, *GEN]
    assert out.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_system_message_and_argument(qwen_tokenizer):
    custom = encode_conversation(qwen_tokenizer, [user("Hi")], tokens_per_tile=4, system="Hi")
    assert custom.input_ids[:6] == [S, SYSTEM, NL, *HI, E, NL]
    from_list = encode_conversation(qwen_tokenizer, [{"role": "system", "content": "Hi"}, user("Hi")], tokens_per_tile=4)
    assert from_list == custom
    dropped = encode_conversation(qwen_tokenizer, [{"role": "system", "content": ""}, user("Hi")], tokens_per_tile=4)
    assert dropped.input_ids[:3] == [S, USER, NL]
    assert encode_conversation(qwen_tokenizer, [user("Hi")], tokens_per_tile=4).text.startswith(
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")


def test_multi_turn_and_supervised_mask(qwen_tokenizer):
    messages = [user("What is this?"), assistant("A cat."), user("Hi")]
    out = encode_conversation(qwen_tokenizer, messages, num_tiles=[1], tokens_per_tile=2)
    first_user = [S, USER, NL, *IMAGE_OPEN, *THUMB, *pads(2), *IMAGE_CLOSE_NL, *WHAT_IS_THIS, E, NL]
    answer = [S, ASSISTANT, NL, *A_CAT, E, NL]
    assert out.input_ids == [*SYS_TURN, *first_user, *answer, S, USER, NL, *HI, E, NL, *GEN]
    start = len(SYS_TURN) + len(first_user) + 3
    expected = [False] * len(out.input_ids)
    expected[start:start + len(A_CAT) + 2] = [True] * (len(A_CAT) + 2)  # "A cat." <|im_end|> "\n"
    assert out.supervised == expected
    assert len(out.supervised) == len(out.input_ids)


def test_supervised_training_sample(qwen_tokenizer):
    messages = [user("What is this?"), assistant("A cat."), user("Hi"), assistant("Hi")]
    out = encode_conversation(qwen_tokenizer, messages, tokens_per_tile=2, add_generation_prompt=False)
    taken = [i for i, s in zip(out.input_ids, out.supervised) if s]
    assert taken == [*A_CAT, E, NL, *HI, E, NL]
    assert out.input_ids[-len(HI) - 2:] == [*HI, E, NL] and all(out.supervised[-len(HI) - 2:])
    hf = encode_conversation(qwen_tokenizer, messages, tokens_per_tile=2, add_generation_prompt=False, style="hf")
    assert [i for i, s in zip(hf.input_ids, hf.supervised) if s] == [*A_CAT, E, *HI, E]


def test_two_images_with_placeholders(qwen_tokenizer):
    content = "Image-1: <image>\nImage-2: <image>\nDescribe both."
    out = encode_conversation(qwen_tokenizer, [user(content)], num_tiles=[1, 3], tokens_per_tile=2)
    assert out.input_ids == [
        *SYS_TURN,
        S, 872, 198, 1906, 12, 16, 25, 366, 1906, 29,  # user \n Image - 1 : " <" Image >
        *THUMB, *pads(2),
        522, 1906, 397, 1906, 12, 17, 25, 366, 1906, 29,  # </ Image >\n Image - 2 : " <" Image >
        *TAG[1], *pads(2), *TAG[2], *pads(2), *THUMB, *pads(2),
        *IMAGE_CLOSE_NL, *DESCRIBE_BOTH, E, NL,
        *GEN,
    ]
    assert out.input_ids.count(P) == (1 + 3) * 2


def test_images_without_placeholders_go_first(qwen_tokenizer):
    messages = [assistant("A cat."), user("Describe both.")]
    out = encode_conversation(qwen_tokenizer, messages, num_tiles=[1, 1], tokens_per_tile=3, system=None)
    explicit = encode_conversation(qwen_tokenizer, [assistant("A cat."), user("<image>\n<image>\nDescribe both.")],
                                   num_tiles=[1, 1], tokens_per_tile=3, system=None)
    assert out == explicit
    assert out.input_ids == [
        S, ASSISTANT, NL, *A_CAT, E, NL,
        S, USER, NL, *IMAGE_OPEN, *THUMB, *pads(3),
        522, 1906, 397, *IMAGE_OPEN, *THUMB, *pads(3),  # "</Image>\n<Image>"
        *IMAGE_CLOSE_NL, *DESCRIBE_BOTH, E, NL,
        *GEN,
    ]
    assert "<|im_start|>user\n<Image><tile_global_thumbnail>" in out.text


def test_placeholder_mismatch(qwen_tokenizer):
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        encode_conversation(qwen_tokenizer, [user("<image>\nHi")], num_tiles=[1, 3], tokens_per_tile=4)
    with pytest.raises(ValueError, match="2 <image> placeholders but 0 images"):
        encode_conversation(qwen_tokenizer, [user("<image>"), user("<image>")], tokens_per_tile=4)
    with pytest.raises(ValueError, match="no user message"):
        encode_conversation(qwen_tokenizer, [], num_tiles=[1], tokens_per_tile=4)


def test_invalid_arguments(qwen_tokenizer):
    bad = [
        ([{"role": "tool", "content": "x"}], {}, "role"),
        ([user("Hi"), {"role": "system", "content": "x"}], {}, "system message"),
        ([{"role": "user", "content": None}], {}, "content"),
        ([user("a <|vision_pad|>")], {}, "vision_pad"),
        ([user("Hi")], {"style": "vllm"}, "style"),
        ([user("Hi")], {"tokens_per_tile": 0}, "tokens_per_tile"),
        ([user("Hi")], {"num_tiles": [0]}, "tile"),
    ]
    for messages, kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            encode_conversation(qwen_tokenizer, messages, **{"tokens_per_tile": 4, **kwargs})


def test_byte_tokenizer_prompt():
    tk = build_byte_tokenizer()
    out = encode_conversation(tk, [user("What is this?"), assistant("A cat.")], num_tiles=[3], tokens_per_tile=5,
                              add_generation_prompt=False)
    assert out.input_ids.count(tk.vision_pad_id) == 15
    assert max(out.input_ids) < len(tk)
    taken = [i for i, s in zip(out.input_ids, out.supervised) if s]
    assert tk.decode(taken, skip_special_tokens=False) == "A cat.<|im_end|>\n"
    assert tk.decode(out.input_ids, skip_special_tokens=False) == out.text
