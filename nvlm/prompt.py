"""NVLM-D prompts: ChatML rendering, image blocks with tile tags, tokenization run by run.

Notable (SPEC 4.2-4.3, 11.1-11.3):
- Default style "megatron" is the format NVLM-D was trained on: `<|im_start|>{role}\n{content}<|im_end|>\n`
  per turn, system "Answer the questions." (an empty system omits the turn), no BOS.
- Each `<image>` becomes `<Image>` + (`<tile_k>` + N x `<|vision_pad|>`) for k < T + `<tile_global_thumbnail>`
  + N x `<|vision_pad|>` + `</Image>`; N (tokens per tile) comes from the model config.
- Megatron inserted tile tags as separately tokenized pieces, so "megatron" encodes run by run: each text
  run as one string (`<Image>` closes the run before a block, `</Image>` opens the run after it), each tag
  on its own, pads as single ids. Encoding `text` in one go differs: `<Image><tile_1>` fuses `><` (1784).
- Style "hf" reproduces the HF remote code: MPT-style `chatml` (no `\n` after `<|im_end|>`, system turn
  always present) and the whole string tokenized at once.
- `supervised` follows Megatron's loss mask: in an assistant turn everything after the 3-token
  `<|im_start|>assistant\n` prefix (content + `<|im_end|>` + `\n`) carries loss; all else does not.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from nvlm.tokenizer import IM_END, IM_START, VISION_PAD, Tokenizer

DEFAULT_SYSTEM = "Answer the questions."
IMAGE_PLACEHOLDER = "<image>"
IMAGE_START = "<Image>"
IMAGE_END = "</Image>"
THUMBNAIL_TAG = "<tile_global_thumbnail>"
STYLES = ("megatron", "hf")
ROLES = ("user", "assistant")


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]
    supervised: list[bool]  # True where training puts loss: assistant content + <|im_end|> (+ "\n")
    text: str  # the rendered prompt, image blocks expanded, pads written as <|vision_pad|>


@dataclass(frozen=True)
class _Tag:
    """A tile tag, tokenized on its own in the megatron style."""

    text: str


@dataclass(frozen=True)
class _Pads:
    """`count` image-feature positions, one `<|vision_pad|>` id each."""

    count: int


_Item = str | _Tag | _Pads


def tile_tags(num_tiles: int) -> list[str]:
    """Tags of an image with `num_tiles` tiles: `<tile_1>`..`<tile_{T-1}>` then the thumbnail's tag (last tile)."""
    if not isinstance(num_tiles, int) or num_tiles < 1:
        raise ValueError(f"an image needs at least one tile, got {num_tiles!r}")
    return [f"<tile_{k}>" for k in range(1, num_tiles)] + [THUMBNAIL_TAG]


_tile_tags = tile_tags  # encode_conversation's `tile_tags` argument shadows the function


def encode_conversation(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    *,
    num_tiles: Sequence[int] = (),
    tokens_per_tile: int,
    system: str | None = DEFAULT_SYSTEM,
    add_generation_prompt: bool = True,
    style: str = "megatron",
    tile_tags: bool = True,
) -> EncodedPrompt:
    """Render and tokenize a chat; `num_tiles[i]` is the tile count (thumbnail included) of the i-th image.

    `messages` are `{"role": "user" | "assistant", "content": str}`; a leading `{"role": "system", ...}`
    replaces `system`. Images are placed at `<image>` placeholders, or, when there are none, as
    `<image>\\n` lines at the start of the first user message. `tile_tags=False` drops the tags (the tiles' tokens
    follow each other inside `<Image>...</Image>`): an ablation, not what NVLM-D was trained with.
    """
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
    if not isinstance(tokens_per_tile, int) or tokens_per_tile < 1:
        raise ValueError(f"tokens_per_tile must be a positive int, got {tokens_per_tile!r}")
    num_tiles = list(num_tiles)
    for t in num_tiles:
        _tile_tags(t)  # validates
    system, turns = _split_system(messages, system)
    turns = _place_images(turns, len(num_tiles))

    sep = "\n" if style == "megatron" else ""
    tiles = iter(num_tiles)
    ids: list[int] = []
    supervised: list[bool] = []
    text: list[str] = []

    def emit(items: list[_Item], prefix_len: int | None) -> None:
        """Tokenize one turn; with `prefix_len`, the turn's ids after that many carry loss."""
        turn_ids = _tokenize(tokenizer, items, style)
        ids.extend(turn_ids)
        if prefix_len is None:
            supervised.extend([False] * len(turn_ids))
        else:
            supervised.extend(i >= prefix_len for i in range(len(turn_ids)))
        text.extend(_render(it) for it in items)

    # MPT-style HF always renders the system turn (empty or not); megatron omits an empty one.
    if system or style == "hf":
        emit([f"{IM_START}system\n{system or ''}{IM_END}{sep}"], None)
    assistant_prefix = f"{IM_START}assistant\n"
    # Megatron masks the assistant prefix by its token count, even if BPE merges it into the content.
    prefix_len = len(tokenizer.encode(assistant_prefix))
    for role, content in turns:
        items = _expand_images(f"{IM_START}{role}\n{content}{IM_END}{sep}", tiles, tokens_per_tile, tile_tags)
        emit(items, prefix_len if role == "assistant" else None)
    if add_generation_prompt:
        emit([assistant_prefix], None)
    return EncodedPrompt(input_ids=ids, supervised=supervised, text="".join(text))


def _split_system(messages: Sequence[Mapping[str, str]], system: str | None) -> tuple[str | None, list[tuple[str, str]]]:
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if VISION_PAD in content:
            raise ValueError(f"message {i}: content must not contain {VISION_PAD}; mark images with {IMAGE_PLACEHOLDER}")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message is only allowed first")
            system = content
        elif role in ROLES:
            turns.append((role, content))
        else:
            raise ValueError(f"message {i}: role must be 'system', 'user' or 'assistant', got {role!r}")
    return system, turns


def _place_images(turns: list[tuple[str, str]], num_images: int) -> list[tuple[str, str]]:
    placeholders = sum(content.count(IMAGE_PLACEHOLDER) for _, content in turns)
    if placeholders == 0 and num_images:
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            raise ValueError(f"{num_images} images given but there is no user message to put them in")
        role, content = turns[first_user]
        turns = list(turns)
        turns[first_user] = (role, f"{IMAGE_PLACEHOLDER}\n" * num_images + content)
        placeholders = num_images
    if placeholders != num_images:
        raise ValueError(f"the messages contain {placeholders} {IMAGE_PLACEHOLDER} placeholders "
                         f"but {num_images} images were given")
    return turns


def _expand_images(turn: str, tiles: Iterator[int], tokens_per_tile: int, tags: bool = True) -> list[_Item]:
    """Split a rendered turn at its `<image>` placeholders into text runs, tags (unless `tags` is false) and pads."""
    pieces = turn.split(IMAGE_PLACEHOLDER)
    items: list[_Item] = []
    run = pieces[0]
    for after in pieces[1:]:
        items.append(run + IMAGE_START)
        for tag in tile_tags(next(tiles)):
            items += [_Tag(tag), _Pads(tokens_per_tile)] if tags else [_Pads(tokens_per_tile)]
        run = IMAGE_END + after
    items.append(run)
    return items


def _render(item: _Item) -> str:
    if isinstance(item, _Pads):
        return VISION_PAD * item.count
    return item.text if isinstance(item, _Tag) else item


def _tokenize(tokenizer: Tokenizer, items: list[_Item], style: str) -> list[int]:
    if style == "hf":
        return tokenizer.encode("".join(_render(it) for it in items))
    ids: list[int] = []
    for it in items:
        if isinstance(it, _Pads):
            ids += [tokenizer.vision_pad_id] * it.count
        else:
            ids += tokenizer.encode(it.text if isinstance(it, _Tag) else it)
    return ids
