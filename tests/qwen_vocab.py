"""Locate the real Qwen2 BPE ranks (`qwen.tiktoken`) for tokenizer tests.

The file ships inside the PyPI wheel `dashscope==2.0.2` (`dashscope/resources/qwen.tiktoken`,
151,643 lines `base64token rank`). Installing that wheel would drag in heavy dependencies, so we
download it with `--no-deps`, pull out the one member and cache it under ~/.cache/nvlm-tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ENV_VAR = "NVLM_QWEN_TIKTOKEN"
WHEEL_SPEC = "dashscope==2.0.2"
WHEEL_MEMBER = "dashscope/resources/qwen.tiktoken"
EXPECTED_LINES = 151_643


def cache_path() -> Path:
    return Path.home() / ".cache" / "nvlm-tests" / "qwen.tiktoken"


def qwen_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken`: $NVLM_QWEN_TIKTOKEN, else the cache, else download into the cache."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_file():
            raise RuntimeError(f"${ENV_VAR} points to {path}, which is not a file")
        return path
    cached = cache_path()
    if cached.is_file():
        return cached
    try:
        _download_to(cached)
    except Exception as exc:  # noqa: BLE001 - any failure gets the same actionable message
        raise RuntimeError(
            f"could not obtain the Qwen vocabulary ({exc}). Either set ${ENV_VAR} to a copy of "
            f"qwen.tiktoken, or run `pip download --no-deps {WHEEL_SPEC}` and extract "
            f"{WHEEL_MEMBER} from the wheel to {cached}"
        ) from exc
    return cached


def _download_to(dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="nvlm-dashscope-") as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "-q", WHEEL_SPEC, "-d", tmp],
            capture_output=True, text=True, timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pip download failed: {proc.stderr.strip()[-500:]}")
        wheels = list(Path(tmp).glob("dashscope-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download produced no dashscope wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(WHEEL_MEMBER)
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if n_lines != EXPECTED_LINES:
        raise RuntimeError(f"{WHEEL_MEMBER} has {n_lines} lines, expected {EXPECTED_LINES}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the destination and rename, so a concurrent or interrupted run never sees half a file.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
