"""Checkpoints: written atomically, read with ``weights_only=True`` (never unpickling code).

A checkpoint is a dict {model, optimizer, scheduler, scaler, iteration, config, class_names,
rng, stage, format}. Loading a model from a checkpoint of another architecture fails with a
message listing the mismatched keys instead of a half-loaded model.

In a run folder, every checkpoint the run writes is followed by an atomic update of the
``last_checkpoint`` file (the name of the newest one, as detectron2 does): after a resumed run
crashed, an old ``model_final.pt`` may sit beside newer periodic checkpoints, and only the
order of writing tells which one is the newest.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from detkit.errors import CheckpointError

CHECKPOINT_FORMAT = "detkit-1"
FINAL_NAME = "model_final.pt"
LAST_CHECKPOINT = "last_checkpoint"
_PERIODIC = re.compile(r"model_(\d+)\.pt")


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file + rename: a crash mid-write leaves
    either the old file or the new one, never a cut-off mixture."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path, state: Dict) -> Path:
    """Write ``state`` to ``path`` via a temporary file + rename, so a crash mid-write never
    leaves a truncated checkpoint where a good one was. A failed write (disk full, ...) is a
    ``CheckpointError``; the file that was at ``path`` before is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # A full disk shows up as OSError or as torch's RuntimeError ("file write failed").
        text = getattr(exc, "strerror", None) or str(exc).strip()
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
        kept = "the previous file is kept" if path.exists() else "nothing was written"
        raise CheckpointError(f"cannot write checkpoint {path}: {reason} ({kept})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_run_checkpoint(path, state: Dict) -> Path:
    """``save_checkpoint`` inside a run folder: afterwards ``last_checkpoint`` names it."""
    path = save_checkpoint(path, state)
    atomic_write_text(path.parent / LAST_CHECKPOINT, path.name + "\n")
    return path


def load_checkpoint(path) -> Dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of files it is about to refuse anyway.
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message suggests weights_only=False, which would run whatever code the
        # file carries: never pass that on. Say what the file is instead.
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path} is not a detkit checkpoint: it holds Python objects other than tensors, "
                "which detkit refuses to load (files written by detkit never do)"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable detkit checkpoint (corrupt, truncated, or not a torch file)"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a detkit checkpoint (top level is {type(state).__name__})")
    if "model" not in state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {"model": state}  # a bare state dict
    if "model" not in state:
        raise CheckpointError(f"{path}: not a detkit checkpoint (no 'model' entry)")
    return state


def _describe(keys: List[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")


def load_model_state(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load that reports missing / unexpected / wrongly shaped keys in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_describe(unexpected)}")
        if shape:
            parts.append(f"shape mismatch {len(shape)}: {_describe(shape, 3)}")
        raise CheckpointError(
            f"{source} does not fit this model (another architecture or class count?): " + "; ".join(parts)
        )
    model.load_state_dict(state_dict)


def checkpoint_iteration(path) -> int:
    """The training iteration a checkpoint was written at: from the name of a periodic
    checkpoint (model_0000042.pt), else from its ``iteration`` entry (0 when it has none)."""
    path = Path(path)
    match = _PERIODIC.fullmatch(path.name)
    if match:
        return int(match.group(1))
    return int(load_checkpoint(path).get("iteration", 0))


def find_last_checkpoint(out_dir) -> Optional[Path]:
    """The newest checkpoint of a run folder: the one ``last_checkpoint`` names; in folders
    without that file (or when it names a file that is gone), the one with the highest
    iteration, ``model_final.pt`` winning a tie (it also holds the later stages' state)."""
    out_dir = Path(out_dir)
    marker = out_dir / LAST_CHECKPOINT
    if marker.is_file():
        named = out_dir / marker.read_text(encoding="utf-8").strip()
        if named.name and named.is_file():
            return named
    candidates = [
        (checkpoint_iteration(p), 0, p) for p in out_dir.glob("model_[0-9]*.pt") if _PERIODIC.fullmatch(p.name)
    ]
    final = out_dir / FINAL_NAME
    if final.is_file():
        candidates.append((checkpoint_iteration(final), 1, final))
    return max(candidates)[2] if candidates else None
