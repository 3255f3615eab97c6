"""Training-state checkpoints: everything needed to resume a run exactly where it stopped.

Layout of `OUTPUT/checkpoints/step_00000040/`:
    state/           model + optimizer via torch.distributed.checkpoint (one shard file per rank, resharded on
                     load, so a run may resume on a different number of ranks); trainable parameters only: the
                     frozen ones come back from the base checkpoint
    trainer.pt       step, LR-scheduler state, the run's config
    rank_<r>.pt      per rank: its data-stream state (`Blend.state_dict()`, rank-strided) and its python / numpy /
                     torch (+ CUDA) RNG states
    COMPLETE         written last

Notable:
- Atomic: everything is written into `.step_00000040.tmp`, fsynced, the `COMPLETE` marker is written and fsynced
  last, then the directory is renamed into place (and the parent directory fsynced). A crash at any point leaves
  either no `step_*` directory or a complete one; `latest_checkpoint` only ever returns directories holding the
  marker, and stale `.tmp` directories are swept at the next save.
- The model/optimizer state reshards to any number of ranks, but each rank's data stream is a stride of the global
  one, so an exact resume needs the same world size (`load_training_state` says so when it differs).
- All ranks take part in saving and loading (the model/optimizer state is sharded); only rank 0 writes trainer.pt
  and renames.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import DistEnv, barrier

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None; incomplete directories are ignored."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            _fsync_path(Path(dirpath, f))
        _fsync_path(Path(dirpath))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _quiet():
    """DCP warns that it saves "in a single process" whenever no process group exists, which is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen parameters (the ViT always; the LLM in pretraining; all base weights under LoRA) are not saved: they
    # are reloaded from the base checkpoint, which keeps checkpoints small. strict=False lets `set_state_dict` skip
    # them; every trainable tensor is still required, because `dcp.load` fails on a key the checkpoint lacks.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_training_state(output_dir: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        trainer_state: dict[str, Any], rank_state: dict[str, Any], env: DistEnv,
                        keep_last: int = 0) -> Path:
    """Write checkpoint `step` atomically (collective: call on every rank). Returns its directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(env)

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank_{env.rank}.pt")
    barrier(env)

    if env.is_main:
        torch.save({"step": step, "world_size": env.world_size, **trainer_state}, tmp / "trainer.pt")
        _fsync_tree(tmp)
        with open(tmp / MARKER, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a previous run wrote this step already; the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
        if keep_last > 0:
            for _, old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def load_training_state(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        env: DistEnv) -> dict[str, Any]:
    """Restore model (trainable part), optimizer and this rank's RNG from `path`.

    Returns trainer.pt's dict with this rank's `rank_<r>.pt` dict (data state, ...) under "rank"."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"{path} is not a complete training checkpoint (no {MARKER} marker)")
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    if trainer.get("world_size") != env.world_size:
        raise ValueError(f"{path} was written by {trainer.get('world_size')} ranks; resume it with the same number "
                         f"(this run has {env.world_size}): each rank's data stream is a stride of the global one")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet():
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_options())
    rank = torch.load(path / f"rank_{env.rank}.pt", weights_only=False)
    set_rng_state(rank.pop("rng"))
    trainer["rank"] = rank
    return trainer
