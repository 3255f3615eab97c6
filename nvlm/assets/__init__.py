"""Files shipped with the package: the tiny default model (tiny-nvlm/, trained by recipes/train_tiny.py)."""

from __future__ import annotations

from pathlib import Path


def default_model_path() -> str | None:
    """The tiny model bundled with the package (nvlm/assets/tiny-nvlm), if this build ships one."""
    here = Path(__file__).parent / "tiny-nvlm"
    return str(here) if (here / "config.json").exists() else None
