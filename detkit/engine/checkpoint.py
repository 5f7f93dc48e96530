"""Checkpoints: written atomically, read with ``weights_only=True`` (never unpickling code).

A checkpoint is a dict {model, optimizer, scheduler, scaler, iteration, config, class_names,
rng, format}. Loading a model from a checkpoint of another architecture fails with a
message listing the mismatched keys instead of a half-loaded model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from detkit.errors import CheckpointError

CHECKPOINT_FORMAT = "detkit-1"


def save_checkpoint(path, state: Dict) -> Path:
    """Write ``state`` to ``path`` via a temporary file + rename, so a crash mid-write never
    leaves a truncated checkpoint where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path) -> Dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {msg[:200]}") from None
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


def find_last_checkpoint(out_dir) -> Optional[Path]:
    """The newest checkpoint in a run folder (model_final.pt counts as the newest)."""
    out_dir = Path(out_dir)
    final = out_dir / "model_final.pt"
    if final.is_file():
        return final
    candidates = sorted(out_dir.glob("model_[0-9]*.pt"))
    return candidates[-1] if candidates else None
