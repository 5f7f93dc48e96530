"""R-CNN's and SPP-net's offline stages, after the SGD fine-tuning stage and before the
evaluation (``detkit.engine.pipelines``); the same code serves both heads (``ClassicHead``):

    cache_features       the training split's regions (ground-truth boxes + up to
                         ``svm.max_proposals`` proposals per image) through the fine-tuned
                         network once, into a feature cache (``detkit.engine.feature_cache``)
    fit_svms             one linear SVM per class with hard-negative mining on the cached
                         features (``detkit.engine.svm.train_svms``; R-CNN sec. 2.3, app. B)
    fit_box_regression   class-specific ridge regression of the box deltas on pool5
                         (``detkit.engine.svm.fit_box_regressors``; R-CNN appendix C)

Shapes: N training images, R regions of one image, K foreground classes, D feature width.

The features are extracted with the TEST transforms (no flip, ``min_size_test``), as the
detector sees test images. The ground-truth rows of an image are its non-difficult boxes
(difficult ones too with ``model.train_difficult``); the overlaps that decide negatives count
every instance, difficult ones included, so that a region on a difficult object is never a
negative.

Every stage is resumable from its outputs: the cache from its finished chunks, the fits by
running again from the cache (seconds to minutes; their results go to the model's buffers and
to a small JSON report written at the end, so a killed fit leaves nothing half-written).
A stage is done when its output says it was made for this config (a fingerprint of the config
values that shape the features, and of the model weights, which the stages check when they
run). The fitted weights are module buffers of the head, so the runner's ``model_final.pt``
carries them to ``detkit eval`` and ``detkit demo``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, cast

import numpy as np
import torch
from tqdm import tqdm

from detkit.config import to_dict
from detkit.data.build import dataset_transforms
from detkit.data.loader import SkippedImages, build_test_loader
from detkit.engine.checkpoint import atomic_write_text
from detkit.engine.feature_cache import FeatureCache, ImageRegions, json_fingerprint, state_fingerprint
from detkit.engine.stages import RunContext, Stage
from detkit.engine.svm import ImageFeatures, SVMSettings, feature_scale, fit_box_regressors, train_svms
from detkit.errors import TrainingError
from detkit.modeling.box_ops import pairwise_iou
from detkit.modeling.heads.rcnn_svm import ClassicHead
from detkit.schema import Config, SVMHeadConfig

logger = logging.getLogger("detkit")

CACHE_DIR = "feature_cache"
SVM_REPORT = "svm_report.json"
BOX_REPORT = "box_regression_report.json"
# The head's buffers the offline stages fill (left out of the weights fingerprint).
FITTED_PREFIXES = ("roi_head.svms.", "roi_head.box_regressor.")

# Settings that do not change what is cached (inference, logging, the fits' own values).
_INFERENCE_KEYS = ("score_thresh", "nms_thresh", "detections_per_img", "min_box_size", "region_batch")
_SVM_FIT_KEYS = (
    "C",
    "pos_weight",
    "bias_mult",
    "neg_iou",
    "hard_thresh",
    "evict_thresh",
    "retrain_limit",
    "max_negatives",
    "max_passes",
    "box_lambda",
    "topk_per_class",
    "cache_dir",
    "images_per_chunk",
)
_TRAIN_RUNTIME_KEYS = ("checkpoint_period", "eval_period", "log_period", "device", "num_threads", "tensorboard")


def cache_config_fingerprint(cfg: Config) -> str:
    """The config values the cached features depend on: the training data and its input
    settings, the model (minus inference-only values and the fits' settings) and the SGD
    schedule that fine-tuned it."""
    model = to_dict(cfg.model)
    model.pop("channels_last_inference", None)
    head = model["roi_head"]
    for key in _INFERENCE_KEYS:
        head.pop(key, None)
    head["svm"] = {k: v for k, v in head["svm"].items() if k not in _SVM_FIT_KEYS}
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in _TRAIN_RUNTIME_KEYS}
    data = {k: v for k, v in to_dict(cfg.data).items() if k not in ("test", "test_batch_size", "num_workers")}
    return json_fingerprint({"model": model, "train": train, "data": data})


def weights_fingerprint(model: torch.nn.Module) -> str:
    return state_fingerprint(model, FITTED_PREFIXES)


def cache_folder(cfg: Config, out_dir: Path) -> Path:
    return Path(cfg.model.roi_head.svm.cache_dir) if cfg.model.roi_head.svm.cache_dir else Path(out_dir) / CACHE_DIR


def classic_head(run: RunContext) -> ClassicHead:
    head = getattr(run.model, "roi_head", None)
    if not isinstance(head, ClassicHead):
        raise TrainingError(
            f"the SVM stages need an rcnn or spp region head (model.roi_head.name), got {type(head).__name__}"
        )
    return head


def svm_settings(s: SVMHeadConfig) -> SVMSettings:
    return SVMSettings(
        C=s.C,
        pos_weight=s.pos_weight,
        bias_mult=s.bias_mult,
        neg_iou=s.neg_iou,
        hard_thresh=s.hard_thresh,
        evict_thresh=s.evict_thresh,
        retrain_limit=s.retrain_limit,
        max_negatives=s.max_negatives,
        max_passes=s.max_passes,
    )


def _log_minutes(run: RunContext, stage: str, start: float) -> float:
    minutes = (time.perf_counter() - start) / 60
    run.results.setdefault("stage_minutes", {})[stage] = minutes
    run.metrics.log({"iter": run.cfg.train.max_iter, "stage": stage, "stage_minutes": minutes})
    return minutes


def _report_done(path: Path, fingerprint: str) -> bool:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("fingerprint") == fingerprint


# -- the feature cache -------------------------------------------------------------------------
class FeatureCacheStage(Stage):
    """Extracts the training split's region features into the feature cache (module doc)."""

    name = "cache_features"

    def done(self, run: RunContext) -> bool:
        return FeatureCache.is_complete(cache_folder(run.cfg, run.out_dir), cache_config_fingerprint(run.cfg))

    def run(self, run: RunContext) -> None:
        start = time.perf_counter()
        cfg, s = run.cfg, run.cfg.model.roi_head.svm
        head = classic_head(run)
        model = run.model.to(run.device)
        if run.train_set is None:
            raise TrainingError("the cache_features stage needs the training split (data.train)")
        dataset = copy.copy(run.train_set)  # the same records, read with the test transforms
        dataset.transforms = dataset_transforms(cfg.data.input, train=False)
        num_classes = head.num_classes
        use_svm = s.classifier == "svm"
        feature_dim = head.feature_dims[s.features] if use_svm else 0
        pool5_dim = head.pool5_dim if s.box_regression else 0
        dtype = "float16" if s.fp16 else "float32"
        cache = FeatureCache.create_or_resume(
            cache_folder(cfg, run.out_dir),
            {
                "config_fingerprint": cache_config_fingerprint(cfg),
                "weights_fingerprint": weights_fingerprint(model),
                "num_images": len(dataset),
                "images_per_chunk": s.images_per_chunk,
                "num_classes": num_classes,
                "features": s.features if use_svm else None,
                "feature_dim": feature_dim,
                "pool5_dim": pool5_dim,
                "dtype": dtype,
                "max_proposals": s.max_proposals,
                "box_min_overlap": s.box_min_overlap,
            },
        )
        ids = [str(r.image_id) for r in dataset.records]
        todo = cache.missing_chunks()
        for c in range(cache.num_chunks):
            if c not in todo:
                cache.check_chunk(c, [ids[i] for i in cache.chunk_indices(c)])
        if len(todo) < cache.num_chunks:
            logger.info(
                "feature cache: %d of %d chunks already done, resuming", cache.num_chunks - len(todo), cache.num_chunks
            )
        extractor = _Extractor(model, head, s, use_svm, np.dtype(dtype), bool(model.train_difficult))
        skipped = SkippedImages("cache_features", "it is left out of the SVM training")
        was_training = model.training
        model.eval()
        bar = tqdm(
            total=len(dataset),
            initial=len(dataset) - sum(len(cache.chunk_indices(c)) for c in todo),
            desc="cache features",
            dynamic_ncols=True,
            disable=None if run.progress else True,
        )
        try:
            for c in todo:
                indices = cache.chunk_indices(c)
                loader = build_test_loader(
                    dataset,
                    cfg.data.test_batch_size,
                    cfg.data.num_workers,
                    cast(int, model.size_divisibility),
                    indices=indices,
                    skip_unreadable=True,
                )
                found: Dict[str, ImageRegions] = {}
                for batch in loader:
                    images, targets = batch
                    skipped.add(batch.skipped)
                    if images is not None:
                        for regions in extractor(images.to(run.device), targets):
                            found[regions.image_id] = regions
                    bar.update(len(targets) + len(batch.skipped))
                images_of_chunk = [
                    found.get(ids[i])
                    or ImageRegions.empty(ids[i], num_classes, feature_dim, pool5_dim, dtype, unreadable=True)
                    for i in indices
                ]
                cache.write_chunk(c, images_of_chunk)
        finally:
            bar.close()
            model.train(was_training)
        summary = skipped.summary()
        if summary:
            logger.warning(summary)
        empty = self._count_empty(cache)
        if empty:
            logger.warning(
                "cache_features: %d of %d training images have no proposals; only their ground-truth boxes are cached "
                "(positives for the SVMs, regression samples)",
                empty,
                len(dataset),
            )
        cache.finish(images_without_proposals=empty, unreadable_images=len(skipped))
        minutes = _log_minutes(run, self.name, start)
        run.results["feature_cache_bytes"] = cache.manifest["bytes"]
        logger.info("feature cache: %s (%.1f min)", cache.describe(), minutes)

    @staticmethod
    def _count_empty(cache: FeatureCache) -> int:
        count = 0
        for c in range(cache.num_chunks):
            a = cache._load_arrays(c, ["num_proposals", "unreadable"])
            count += int(((a["num_proposals"] == 0) & ~a["unreadable"]).sum())
        return count


class _Extractor:
    """One batch of training images -> their ``ImageRegions`` (see the module docs)."""

    def __init__(self, model, head: ClassicHead, s: SVMHeadConfig, use_svm: bool, dtype: np.dtype, difficult: bool):
        self.model, self.head, self.s = model, head, s
        self.use_svm, self.dtype, self.train_difficult = use_svm, dtype, difficult

    @torch.no_grad()
    def __call__(self, images, targets) -> List[ImageRegions]:
        model, head, s = self.model, self.head, self.s
        x = images.tensor
        if getattr(model, "channels_last_inference", False):
            x = x.contiguous(memory_format=torch.channels_last)
        features = model.backbone(x)
        proposals, _ = model.proposal_generator(images, features)
        # per image: its ground-truth rows (positives) first, then its proposals (R-CNN's order)
        rows, truths = [], []
        for p, t in zip(proposals, targets):
            t = t.to(x.device)
            positive = torch.ones(len(t.boxes), dtype=torch.bool, device=x.device)
            if t.difficult is not None and not self.train_difficult:
                positive = ~t.difficult
            boxes = p.boxes[: s.max_proposals].float()
            rows.append(torch.cat([t.boxes.float()[positive], boxes], 0))
            truths.append((t.boxes.float(), t.labels, positive, len(boxes), str(t.image_id)))
        layers = {"pool5"} | ({s.features} if self.use_svm else set())
        feats = head.region_features(images, features, rows, sorted(layers))
        counts = [len(r) for r in rows]
        pool5_all = feats["pool5"].float().split(counts)
        svm_all = feats[s.features].float().split(counts) if self.use_svm else [None] * len(rows)
        return [
            self._image(r, truth, pool5.cpu(), None if f is None else f.cpu())
            for r, truth, pool5, f in zip(rows, truths, pool5_all, svm_all)
        ]

    def _image(self, rows: torch.Tensor, truth, pool5: torch.Tensor, svm_feats: Optional[torch.Tensor]) -> ImageRegions:
        gt_boxes, gt_labels, positive, num_proposals, image_id = truth
        k, s = self.head.num_classes, self.s
        rows = rows.cpu()
        gt_boxes, gt_labels, positive = gt_boxes.cpu(), gt_labels.cpu(), positive.cpu()
        n_gt = int(positive.sum())
        gt_class = torch.zeros(len(rows), dtype=torch.int64)
        gt_class[:n_gt] = gt_labels[positive]
        # IoU with the closest instance of each class, difficult ones included (never negatives)
        iou = pairwise_iou(gt_boxes, rows)  # (G, R)
        overlaps = torch.zeros((len(rows), k))
        for c in range(1, k + 1):
            if (gt_labels == c).any():
                overlaps[:, c - 1] = iou[gt_labels == c].max(0).values
        # box regression: the rows whose best IoU with a positive ground-truth box reaches the
        # threshold, with that box and its class (rcnn_train_bbox_regressor.m)
        pool5_dim = self.head.pool5_dim if s.box_regression else 0
        reg_rows = torch.zeros((0,), dtype=torch.int64)
        best, which = torch.zeros(len(rows)), torch.zeros(len(rows), dtype=torch.int64)
        if s.box_regression and n_gt:
            best, which = iou[positive].max(0)
            reg_rows = torch.nonzero(best >= s.box_min_overlap).squeeze(1)
        matched = which[reg_rows]
        features = svm_feats.numpy() if svm_feats is not None else np.zeros((len(rows), 0), np.float32)
        return ImageRegions(
            image_id=image_id,
            boxes=rows.numpy().astype(np.float32),
            gt_class=gt_class.numpy(),
            overlaps=overlaps.numpy(),
            features=features.astype(self.dtype),
            feature_norms=np.linalg.norm(features, axis=1).astype(np.float32),
            pool5_norms=pool5.norm(dim=1).numpy().astype(np.float32),
            reg_rows=reg_rows.numpy().astype(np.int64),
            reg_features=pool5[reg_rows].numpy().astype(self.dtype).reshape(len(reg_rows), pool5_dim),
            reg_gt=gt_boxes[positive][matched].numpy().astype(np.float32).reshape(-1, 4),
            reg_class=gt_labels[positive][matched].numpy().astype(np.int64),
            reg_iou=best[reg_rows].numpy().astype(np.float32),
            num_proposals=num_proposals,
        )


# -- the SVMs ----------------------------------------------------------------------------------
def _open_cache(run: RunContext) -> FeatureCache:
    return FeatureCache.open(
        cache_folder(run.cfg, run.out_dir), cache_config_fingerprint(run.cfg), weights_fingerprint(run.model)
    )


class SVMStage(Stage):
    """Fits the K class SVMs on the cached features (scaled to mean norm 20) with
    hard-negative mining and loads them into the head (``head.svms``); writes
    ``svm_report.json`` (per class: positives, cached negatives, hard negatives added per pass,
    fits, objective). Run again from the cache when resumed."""

    name = "fit_svms"
    changes_model = True

    def _fingerprint(self, cfg: Config) -> str:
        return json_fingerprint([cache_config_fingerprint(cfg), to_dict(cfg.model.roi_head.svm)])

    def done(self, run: RunContext) -> bool:
        return _report_done(run.out_dir / SVM_REPORT, self._fingerprint(run.cfg))

    def run(self, run: RunContext) -> None:
        start = time.perf_counter()
        head = classic_head(run)
        cache = _open_cache(run)
        if cache.manifest.get("feature_dim") != head.feature_dims[run.cfg.model.roi_head.svm.features]:
            raise TrainingError(f"feature cache {cache.folder} holds no SVM features (made with classifier: softmax?)")
        scale = feature_scale(cache.norms("feature_norms"))

        def load_image(i: int) -> ImageFeatures:
            r = cache.image(i)
            return ImageFeatures(r.features.astype(np.float32) * np.float32(scale), r.overlaps, r.gt_class)

        models = train_svms(
            load_image, cache.num_images, head.num_classes, svm_settings(run.cfg.model.roi_head.svm), run.class_names
        )
        k = head.num_classes
        weight = np.stack([models[c].weight for c in range(1, k + 1)])
        bias = np.array([models[c].bias for c in range(1, k + 1)], np.float32)
        head.svms.set(torch.from_numpy(weight), torch.from_numpy(bias), scale)
        minutes = _log_minutes(run, self.name, start)
        report = {
            "fingerprint": self._fingerprint(run.cfg),
            "feature_scale": scale,
            "minutes": minutes,
            "classes": {
                run.class_names[c - 1]: {
                    "positives": models[c].positives,
                    "negatives": models[c].negatives,
                    "hard_negatives_per_pass": models[c].hard_per_pass,
                    "fits": models[c].fits,
                    "objective": models[c].objective,
                    "trained": bool(np.isfinite(models[c].bias)),
                }
                for c in range(1, k + 1)
            },
        }
        atomic_write_text(run.out_dir / SVM_REPORT, json.dumps(report, indent=1) + "\n")
        logger.info("SVMs fitted in %.1f min (feature scale %.4g)", minutes, scale)


# -- box regression ----------------------------------------------------------------------------
class BoxRegressionStage(Stage):
    """Fits the class-specific ridge box regressors on the cached pool5 features of the
    regions with IoU above ``svm.box_min_overlap`` with a ground-truth box (scaled to mean norm
    20 like R-CNN's) and loads them into the head (``head.box_regressor``); writes
    ``box_regression_report.json``."""

    name = "fit_box_regression"
    changes_model = True

    def _fingerprint(self, cfg: Config) -> str:
        s = cfg.model.roi_head.svm
        return json_fingerprint([cache_config_fingerprint(cfg), s.box_lambda, s.box_min_overlap])

    def done(self, run: RunContext) -> bool:
        return _report_done(run.out_dir / BOX_REPORT, self._fingerprint(run.cfg))

    def run(self, run: RunContext) -> None:
        start = time.perf_counter()
        s = run.cfg.model.roi_head.svm
        head = classic_head(run)
        cache = _open_cache(run)
        if cache.manifest.get("pool5_dim") != head.pool5_dim:
            raise TrainingError(f"feature cache {cache.folder} holds no pool5 features (made without box_regression?)")
        scale = feature_scale(cache.norms("pool5_norms"))
        q = cache.regression_samples()
        reg = fit_box_regressors(
            q["features"].astype(np.float32) * np.float32(scale),
            q["boxes"],
            q["gt"],
            q["classes"],
            q["ious"],
            head.num_classes,
            lam=s.box_lambda,
            min_overlap=s.box_min_overlap,
            class_names=run.class_names,
        )
        head.box_regressor.set(torch.from_numpy(reg.weight), torch.from_numpy(reg.bias), scale)
        minutes = _log_minutes(run, self.name, start)
        report = {
            "fingerprint": self._fingerprint(run.cfg),
            "feature_scale": scale,
            "minutes": minutes,
            "samples_per_class": dict(zip(run.class_names, reg.samples)),
        }
        atomic_write_text(run.out_dir / BOX_REPORT, json.dumps(report, indent=1) + "\n")
        logger.info("box regressors fitted in %.1f min on %s regions", minutes, sum(reg.samples))


def svm_stages(cfg: Config) -> List[Stage]:
    """The offline stages a classic head's config asks for (none with classifier softmax and
    no box regression)."""
    s = cfg.model.roi_head.svm
    stages: List[Stage] = []
    if s.classifier == "svm" or s.box_regression:
        stages.append(FeatureCacheStage())
    if s.classifier == "svm":
        stages.append(SVMStage())
    if s.box_regression:
        stages.append(BoxRegressionStage())
    return stages
