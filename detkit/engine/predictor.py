"""Loading a trained detector and running it on single images (demo, notebooks).

predictor = Predictor.from_checkpoint("runs/x/model_final.pt")   # config stored inside
det = predictor(rgb_uint8_array)            # Detections in the image's own pixels
"""

from __future__ import annotations

import copy
import logging
from typing import List, Optional, Sequence

import numpy as np
import torch

from detkit.config import from_dict
from detkit.data.build import dataset_transforms
from detkit.engine.checkpoint import load_checkpoint, load_model_state
from detkit.engine.inference import denormals_flushed, device_from_config, inference_model
from detkit.errors import CheckpointError
from detkit.modeling.build import build_model
from detkit.schema import Config
from detkit.structures import Detections, Geometry, ImageList, Target

logger = logging.getLogger("detkit")


def model_from_checkpoint(path, cfg: Optional[Config] = None, device="cpu"):
    """-> (model in eval mode, config, class names). ``cfg`` (e.g. from a YAML the user
    passes) takes precedence over the config stored in the checkpoint."""
    state = load_checkpoint(path)
    class_names = state.get("class_names")
    if cfg is None:
        if "config" not in state:
            raise CheckpointError(f"{path} stores no config; pass --config")
        cfg = from_dict(Config, state["config"])
    if not class_names:
        classes = cfg.data.classes or (cfg.data.train.classes if cfg.data.train else None)
        if not classes:
            raise CheckpointError(f"{path} stores no class names and the config sets none (data.classes)")
        class_names = list(classes)
    # Every weight comes from the checkpoint: do not load (or download) ImageNet weights first.
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.pretrained = None
    # An SVD-compressed checkpoint (detkit compress) has factorised fc layers: their shape is
    # the checkpoint's, whichever config the user passes for data and evaluation.
    stored_svd = (((state.get("config") or {}).get("model") or {}).get("roi_head") or {}).get("svd")
    if stored_svd and not cfg.model.roi_head.svd:
        cfg.model.roi_head.svd = {str(k): int(v) for k, v in stored_svd.items()}
        logger.info("%s is SVD-compressed: %s", path, ", ".join(f"{k} rank {v}" for k, v in stored_svd.items()))
    model = build_model(cfg.model, len(class_names), cfg.data.input)
    load_model_state(model, state["model"], str(path))
    model.to(device).eval()
    return model, cfg, list(class_names)


class Predictor:
    def __init__(self, model, cfg: Config, class_names: Sequence[str], device="cpu"):
        # eval mode; BatchNorm folded into the convolutions when the model asks for it (a copy).
        self.model = inference_model(model.eval())
        self.cfg = cfg
        self.class_names = list(class_names)
        self.device = torch.device(device)
        self.transforms = dataset_transforms(cfg.data.input, train=False)

    @classmethod
    def from_checkpoint(cls, path, cfg: Optional[Config] = None, device: str = "auto") -> "Predictor":
        dev = device_from_config(device) if device in ("auto", "cpu", "cuda") else torch.device(device)
        model, cfg, names = model_from_checkpoint(path, cfg, dev)
        return cls(model, cfg, names, dev)

    @torch.no_grad()
    def predict_batch(self, images: List[np.ndarray]) -> List[Detections]:
        """images: (H, W, 3) uint8 RGB arrays -> detections in their own pixels (CPU)."""
        tensors, geometries = [], []
        for array in images:
            t = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)
            h, w = array.shape[:2]
            empty = Target(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64), geometry=Geometry.identity(h, w))
            t, target = self.transforms(t, empty)
            tensors.append(t)
            geometries.append(target.geometry)
        batch = ImageList.from_tensors(tensors, self.model.size_divisibility, geometries=geometries)
        with denormals_flushed(self.cfg.train.flush_denormal):
            detections, _ = self.model(batch.to(self.device))
        return [d.to("cpu") for d in detections]

    def __call__(self, image: np.ndarray) -> Detections:
        return self.predict_batch([image])[0]
