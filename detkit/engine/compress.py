"""SVD compression of a trained detector's fully connected layers (Fast R-CNN, Girshick 2015,
sec. 3.1): the engine side of ``detkit compress``.

    model, cfg, classes = model_from_checkpoint("run/model_final.pt")
    layers = compress_model(model, cfg, {"fc6": 1024, "fc7": 256}, source="run/model_final.pt")
    save_compressed(model, cfg, classes, "run/model_svd.pt", source="run/model_final.pt")

Which layers: the RoI head's ``box_head`` (fc6 / fc7 of the Fast / Faster R-CNN head; the
module a head builder hands to ``modeling.build.apply_svd``), by their names there. Each
chosen layer W (u x v) becomes Sigma_t V_t^T (t x v, no bias) then U_t (u x t, the original
bias) (``modeling.heads.compress``). The ranks are written to the checkpoint's config as
``model.roi_head.svd``, so that ``build_model`` builds the factorised layers and the
compressed checkpoint loads wherever the original did, with no extra flag; before anything
is written, a model rebuilt from that config must take the compressed weights.

Refused with one line (``ExportError``): a head without fully connected layers, a layer name
it does not have, a rank larger than the layer allows, a checkpoint that is compressed
already (compress the original instead).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from torch import nn

from detkit.config import to_dict
from detkit.engine.checkpoint import load_model_state, save_checkpoint
from detkit.errors import CheckpointError, ExportError
from detkit.modeling.build import build_model
from detkit.modeling.heads.compress import SVDLinear, compress_layers
from detkit.schema import Config

logger = logging.getLogger("detkit")


def parse_ranks(fc6: Optional[int], fc7: Optional[int], layers: Sequence[str] = ()) -> Dict[str, int]:
    """--fc6 R, --fc7 R and --layer NAME=R (repeatable) -> {name: rank}; ExportError on a
    malformed or repeated entry, or on none at all."""
    ranks: Dict[str, int] = {}
    entries = [("fc6", fc6), ("fc7", fc7)]
    for item in layers:
        name, sep, value = item.partition("=")
        try:
            rank = int(value)
        except ValueError:
            rank = None
        if not sep or not name.strip() or rank is None:
            raise ExportError(f"--layer {item!r}: expected NAME=RANK, e.g. fc6=1024")
        entries.append((name.strip(), rank))
    for name, rank in entries:
        if rank is None:
            continue
        if name in ranks:
            raise ExportError(f"layer {name} is given two ranks ({ranks[name]} and {rank})")
        if rank < 1:
            raise ExportError(f"layer {name}: the rank must be >= 1, got {rank}")
        ranks[name] = int(rank)
    if not ranks:
        raise ExportError("no layer to compress: give --fc6 RANK, --fc7 RANK or --layer NAME=RANK")
    return ranks


def fc_layers(module: nn.Module) -> List[str]:
    """Names of the fully connected children (plain or already factorised)."""
    return [n for n, m in module.named_children() if isinstance(m, (nn.Linear, SVDLinear))]


def box_head_of(model: nn.Module, source: str) -> nn.Module:
    """The module whose fc layers ``model.roi_head.svd`` names: the RoI head's box head."""
    head = getattr(model, "roi_head", None)
    box_head = getattr(head, "box_head", None)
    if not isinstance(box_head, nn.Module) or not fc_layers(box_head):
        raise ExportError(
            f"{source}: the RoI head ({type(head).__name__}) has no fully connected layers to compress "
            "(SVD applies to heads with fc6 / fc7, e.g. Fast / Faster R-CNN)"
        )
    return box_head


def _layer_entry(layer: nn.Linear, rank: int) -> Dict:
    out_f, in_f = layer.weight.shape
    bias = out_f if layer.bias is not None else 0
    return {
        "shape": [int(out_f), int(in_f)],
        "rank": int(rank),
        "params_before": int(out_f * in_f + bias),
        "params_after": int(rank * (in_f + out_f) + out_f),
    }


def compress_model(model: nn.Module, cfg: Config, ranks: Mapping[str, int], source: str = "checkpoint") -> Dict:
    """Factorise the box head's layers of a loaded ``model`` in place and record the ranks in
    ``cfg.model.roi_head.svd``. -> {layer: {shape, rank, params_before, params_after}}."""
    if cfg.model.roi_head.svd:
        done = ", ".join(f"{k}={v}" for k, v in cfg.model.roi_head.svd.items())
        raise ExportError(
            f"{source} is compressed already (model.roi_head.svd: {done}); compress the original checkpoint"
        )
    box_head = box_head_of(model, source)
    have = fc_layers(box_head)
    if any(isinstance(getattr(box_head, n), SVDLinear) for n in have):
        raise ExportError(f"{source} is compressed already (its box head has SVD layers); compress the original")
    missing = [n for n in ranks if n not in have]
    if missing:
        raise ExportError(
            f"{source}: the box head has no fully connected layer {', '.join(missing)} "
            f"(its fc layers: {', '.join(have)})"
        )
    report = {name: _layer_entry(getattr(box_head, name), rank) for name, rank in ranks.items()}
    try:
        compress_layers(box_head, dict(ranks), from_weights=True)
    except ExportError as exc:
        raise ExportError(f"{source}: {exc}") from None
    cfg.model.roi_head.svd = dict(ranks)
    return report


def save_compressed(model: nn.Module, cfg: Config, class_names: Sequence[str], out, source: str) -> Path:
    """Write the compressed checkpoint (model, config with ``roi_head.svd``, class names)
    after checking that a model built from that config takes its weights. Written atomically
    with ``save_checkpoint`` (not a run checkpoint: the run folder's ``last_checkpoint`` is
    left alone, so resuming the original run never picks this file up)."""
    rebuilt_cfg = copy.deepcopy(cfg)
    rebuilt_cfg.model.backbone.pretrained = None
    rebuilt = build_model(rebuilt_cfg.model, len(class_names), rebuilt_cfg.data.input)
    state = model.state_dict()
    try:
        load_model_state(rebuilt, state, "the compressed model")
    except CheckpointError as exc:
        raise ExportError(
            f"the compressed model does not rebuild from its config (does the {cfg.model.roi_head.name} head's "
            f"builder apply model.roi_head.svd?): {exc}"
        ) from None
    return save_checkpoint(
        out,
        {
            "model": state,
            "config": to_dict(cfg),
            "class_names": list(class_names),
            "stage": "compress",
            "compressed_from": str(Path(source).resolve()),
        },
    )
