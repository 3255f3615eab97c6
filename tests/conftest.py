"""Shared fixtures. The real Qwen2 vocabulary comes from tests/qwen_vocab.py (cached download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvlm.tokenizer import Tokenizer, build_qwen2_tokenizer
from qwen_vocab import qwen_tiktoken_path


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with the Qwen2.5 tokenizer files (slow + tokenizer.json) as nvlm writes them."""
    path = tmp_path_factory.mktemp("qwen_tokenizer")
    build_qwen2_tokenizer(qwen_tiktoken_path()).save(path)
    return path


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(qwen_tokenizer_dir)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skip them cleanly where there is none (CI never has a GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
