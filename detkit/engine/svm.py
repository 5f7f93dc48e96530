"""R-CNN's non-gradient training (Girshick et al., CVPR 2014): one linear SVM per class fitted
with hard-negative mining (sec. 2.3, appendix B), and class-specific ridge box regression
(appendix C), both with scikit-learn on cached CNN features. SPP-net (He et al., ECCV 2014,
sec. 4.2) trains its SVMs and regressors the same way; both use this module.

Shapes: R regions of one image (proposals and ground-truth boxes), D feature width,
K foreground classes (labels 1..K; 0 = background), M regression samples.

SVMs (sec. 2.3 and appendix B, with the settings of the authors' rcnn_train.m):
- positives of class k are the ground-truth boxes of class k only; negatives are regions
  whose IoU with every instance of class k is below 0.3; regions in between are ignored;
- features are scaled so that their mean L2 norm is 20 (rcnn_scale_features.m: then one C
  suits every layer); the SVM is liblinear's L2-regularised hinge-loss SVM with C = 1e-3, a
  loss weight of 2 on positives and a bias feature of 10, i.e. scikit-learn's
  ``LinearSVC(loss="hinge", C=1e-3, class_weight={1: 2}, intercept_scaling=10)``;
- hard-negative mining: the first image gives all its negatives; after that an image gives
  only the negatives the current model scores above -1 (margin violators, hinge loss > 0)
  that are not cached yet; a class is refitted when more than ``retrain_limit`` negatives
  were added since its last fit and at the end of a pass, and after each fit negatives scored
  below -1.2 are evicted ("easy"). The negative cache of a class is bounded by
  ``max_negatives`` (the hardest are kept), so memory does not grow with the dataset.
  Passes repeat until one adds no new hard negative or ``max_passes`` is reached (the
  authors used one pass).

Box regression (appendix C, rcnn_train_bbox_regressor.m): for each class, the regions whose
best IoU with a ground-truth box of that class exceeds 0.6 regress the deltas
t = ((g_x - p_x) / p_w, (g_y - p_y) / p_h, log(g_w / p_w), log(g_h / p_h)) from their
pool5-level features by ridge regression with lambda = 1000. Targets are standardised per
class before the fit (the authors' code whitens them), and the standardisation is folded
back into the returned weights, so that the regressor is one plain linear map.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Ridge
from sklearn.svm import LinearSVC

logger = logging.getLogger("detkit")

# rcnn_scale_features.m: features are rescaled to this mean L2 norm.
TARGET_FEATURE_NORM = 20.0


@dataclass
class SVMSettings:
    """R-CNN's SVM recipe (rcnn_train.m unless said): C, positive loss weight, bias feature
    value; negatives below ``neg_iou`` with every instance of the class (sec. 2.3: 0.3);
    a negative is hard when scored above ``hard_thresh`` and evicted below ``evict_thresh``;
    refit after ``retrain_limit`` new negatives; at most ``max_negatives`` cached per class
    (detkit's memory bound); ``max_passes`` over the training images; the solver's ``tol``
    and ``max_iter``."""

    C: float = 1e-3
    pos_weight: float = 2.0
    bias_mult: float = 10.0
    neg_iou: float = 0.3
    hard_thresh: float = -1.0001
    evict_thresh: float = -1.2
    retrain_limit: int = 2000
    max_negatives: int = 20000
    max_passes: int = 2
    # liblinear 1.94 as rcnn_train.m called it (no -e): the dual solver of -s 3 stops at a
    # maximal dual violation of 0.1 or after 1000 iterations (linear.cpp). A tighter
    # tolerance fits the same hinge loss more exactly, at many times the cost.
    tol: float = 0.1
    max_iter: int = 1000

    def __post_init__(self):
        if not 0.0 < self.neg_iou <= 1.0:
            raise ValueError(f"neg_iou must be in (0, 1], got {self.neg_iou}")
        if self.max_negatives < 1 or self.max_passes < 1 or self.retrain_limit < 1:
            raise ValueError("max_negatives, max_passes and retrain_limit must be >= 1")
        if self.evict_thresh > self.hard_thresh:
            raise ValueError("evict_thresh must not exceed hard_thresh")


@dataclass
class ImageFeatures:
    """The cached regions of one training image: features (R, D) float32 (already scaled),
    overlaps (R, K) the IoU of each region with the closest ground-truth box of each class
    (1 for a ground-truth box with its own class), gt_class (R,) the class of a ground-truth
    row (1..K) and 0 for a proposal."""

    features: np.ndarray
    overlaps: np.ndarray
    gt_class: np.ndarray


@dataclass
class ClassSVM:
    """What was learnt for one class, and how: weights (D,), bias, the cache sizes at the
    end and per pass the number of hard negatives added."""

    weight: np.ndarray
    bias: float
    positives: int
    negatives: int
    hard_per_pass: List[int] = field(default_factory=list)
    fits: int = 0
    objective: Optional[float] = None


def feature_scale(norms: np.ndarray) -> float:
    """The factor that brings features of these L2 norms to a mean norm of 20."""
    mean = float(np.mean(norms)) if len(norms) else 0.0
    return TARGET_FEATURE_NORM / mean if mean > 0 else 1.0


def fit_svm(x_pos: np.ndarray, x_neg: np.ndarray, settings: SVMSettings) -> Tuple[np.ndarray, float]:
    """One hinge-loss linear SVM: positives (P, D) vs negatives (Q, D) -> (w (D,), b)."""
    x = np.concatenate([x_pos, x_neg]).astype(np.float32, copy=False)
    y = np.concatenate([np.ones(len(x_pos), np.int64), np.zeros(len(x_neg), np.int64)])
    svm = LinearSVC(
        loss="hinge",
        C=settings.C,
        class_weight={1: settings.pos_weight, 0: 1.0},
        intercept_scaling=settings.bias_mult,
        dual=True,
        max_iter=settings.max_iter,
        tol=settings.tol,
        # liblinear visits the samples in a random order: a fixed seed makes a refit (a
        # resumed run) give the same SVM
        random_state=0,
    )
    with warnings.catch_warnings():
        # liblinear's dual solver often stops at max_iter on separable data with a tiny C;
        # the solution is still the usable one (the authors' liblinear did the same).
        warnings.simplefilter("ignore", ConvergenceWarning)
        svm.fit(x, y)
    return svm.coef_[0].astype(np.float32), float(svm.intercept_[0])


def svm_objective(w: np.ndarray, b: float, x_pos: np.ndarray, x_neg: np.ndarray, settings: SVMSettings) -> float:
    """The primal objective liblinear minimises (rcnn_train.m's log line): hinge losses
    weighted by C (positives x pos_weight) + 0.5 |w|^2 + 0.5 (b / bias_mult)^2."""
    z_pos = x_pos @ w + b
    z_neg = x_neg @ w + b
    hinge = settings.pos_weight * np.maximum(0, 1 - z_pos).sum() + np.maximum(0, 1 + z_neg).sum()
    return float(settings.C * hinge + 0.5 * w @ w + 0.5 * (b / settings.bias_mult) ** 2)


class _NegativeCache:
    """The negatives of one class: features and (image, row) keys, bounded in size."""

    def __init__(self, dim: int, capacity: int):
        self.x = np.zeros((0, dim), np.float32)
        self.keys: List[Tuple[int, int]] = []
        self.key_set: set = set()
        self.capacity = int(capacity)
        self.added_since_fit = 0

    def add(self, x: np.ndarray, keys: Sequence[Tuple[int, int]]) -> int:
        new = [i for i, k in enumerate(keys) if k not in self.key_set]
        if not new:
            return 0
        self.x = np.concatenate([self.x, x[new]])
        for i in new:
            self.keys.append(keys[i])
            self.key_set.add(keys[i])
        self.added_since_fit += len(new)
        return len(new)

    def keep(self, mask: np.ndarray) -> None:
        self.x = self.x[mask]
        self.keys = [k for k, m in zip(self.keys, mask) if m]
        self.key_set = set(self.keys)

    def bound(self, scores: np.ndarray) -> None:
        """Keep the ``capacity`` hardest (highest scored) negatives."""
        if len(self.keys) > self.capacity:
            order = np.argsort(-scores, kind="stable")[: self.capacity]
            mask = np.zeros(len(self.keys), bool)
            mask[order] = True
            self.keep(mask)


def train_svms(
    load_image: Callable[[int], ImageFeatures],
    num_images: int,
    num_classes: int,
    settings: Optional[SVMSettings] = None,
    class_names: Optional[Sequence[str]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[int, ClassSVM]:
    """Fits the K class SVMs with hard-negative mining over ``num_images`` images read with
    ``load_image(i)`` (in order, once per pass plus once for the positives). -> {class k
    (1..K): ClassSVM}. A class without positives gets no SVM (w = 0, b = -inf: it never
    fires) and a warning naming it."""
    settings = settings or SVMSettings()
    names = list(class_names) if class_names else [str(k) for k in range(1, num_classes + 1)]
    say = progress or (lambda msg: logger.info("%s", msg))

    # Positives: the ground-truth rows of each class, all of them (sec. 2.3).
    positives: Dict[int, List[np.ndarray]] = {k: [] for k in range(1, num_classes + 1)}
    dim = None
    for i in range(num_images):
        item = load_image(i)
        dim = item.features.shape[1] if dim is None else dim
        for k in range(1, num_classes + 1):
            rows = item.gt_class == k
            if rows.any():
                positives[k].append(item.features[rows])
    if dim is None:
        raise ValueError("train_svms needs at least one image")
    x_pos = {k: np.concatenate(v) if v else np.zeros((0, dim), np.float32) for k, v in positives.items()}

    caches = {k: _NegativeCache(dim, settings.max_negatives) for k in x_pos}
    models: Dict[int, ClassSVM] = {}
    weights = np.zeros((num_classes, dim), np.float32)
    biases = np.zeros(num_classes, np.float32)
    fitted = np.zeros(num_classes, bool)
    missing = [names[k - 1] for k in x_pos if len(x_pos[k]) == 0]
    if missing:
        logger.warning(
            "no positives in the training split for %s: no SVM is trained for them (they never fire)",
            ", ".join(missing),
        )

    def refit(k: int) -> None:
        cache = caches[k]
        if len(x_pos[k]) == 0 or len(cache.keys) == 0:
            return
        w, b = fit_svm(x_pos[k], cache.x, settings)
        weights[k - 1], biases[k - 1], fitted[k - 1] = w, b, True
        model = models.setdefault(k, ClassSVM(w, b, len(x_pos[k]), 0))
        model.weight, model.bias, model.fits = w, b, model.fits + 1
        scores = cache.x @ w + b
        cache.keep(scores >= settings.evict_thresh)  # evict easy negatives
        cache.bound(cache.x @ w + b)
        cache.added_since_fit = 0

    for epoch in range(settings.max_passes):
        added = {k: 0 for k in x_pos}
        for i in range(num_images):
            item = load_image(i)
            neg = item.overlaps < settings.neg_iou  # (R, K), GT rows have overlap 1 with their class
            first = epoch == 0 and i == 0
            scores = item.features @ weights.T + biases if not first else None
            for k in x_pos:
                if len(x_pos[k]) == 0:
                    continue
                rows = neg[:, k - 1] & (item.gt_class == 0)
                if not first and fitted[k - 1]:
                    assert scores is not None
                    rows &= scores[:, k - 1] > settings.hard_thresh
                idx = np.nonzero(rows)[0]
                if len(idx):
                    added[k] += caches[k].add(item.features[idx], [(i, int(r)) for r in idx])
                if first or caches[k].added_since_fit > settings.retrain_limit or not fitted[k - 1]:
                    refit(k)
        for k in x_pos:
            if caches[k].added_since_fit > 0 or not fitted[k - 1]:
                refit(k)
            if k in models:
                models[k].hard_per_pass.append(added[k])
        say(
            f"SVM pass {epoch + 1}: hard negatives added per class: "
            + ", ".join(f"{names[k - 1]} {added[k]}" for k in x_pos)
        )
        if epoch > 0 and sum(added.values()) == 0:
            break

    for k in x_pos:
        if k not in models:
            models[k] = ClassSVM(np.zeros(dim, np.float32), float("-inf"), len(x_pos[k]), len(caches[k].keys))
            continue
        m = models[k]
        m.negatives = len(caches[k].keys)
        m.objective = svm_objective(m.weight, m.bias, x_pos[k], caches[k].x, settings)
    return models


# -- box regression ---------------------------------------------------------------------------
def encode_deltas(targets: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(M, 4) xyxy ground truth and regions -> (M, 4) deltas (appendix C, eqs. 1-4 inverted)."""
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    px, py = boxes[:, 0] + 0.5 * pw, boxes[:, 1] + 0.5 * ph
    gw, gh = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    gx, gy = targets[:, 0] + 0.5 * gw, targets[:, 1] + 0.5 * gh
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)


@dataclass
class BoxRegressor:
    """Per class k: deltas = features @ weight[k] + bias[k]; weight (K, D, 4), bias (K, 4).
    samples: the number of regions each class was fitted on (0: identity, no shift)."""

    weight: np.ndarray
    bias: np.ndarray
    samples: List[int]


def fit_box_regressors(
    features: np.ndarray,
    boxes: np.ndarray,
    gt_boxes: np.ndarray,
    classes: np.ndarray,
    overlaps: np.ndarray,
    num_classes: int,
    lam: float = 1000.0,
    min_overlap: float = 0.6,
    class_names: Optional[Sequence[str]] = None,
) -> BoxRegressor:
    """features (M, D) of regions ``boxes`` (M, 4), each with its best-overlapping ground-truth
    box ``gt_boxes`` (M, 4) of class ``classes`` (M,) at IoU ``overlaps`` (M,). Regions with
    IoU > ``min_overlap`` train the regressor of their class (ridge, ``lam``)."""
    dim = features.shape[1]
    weight = np.zeros((num_classes, dim, 4), np.float32)
    bias = np.zeros((num_classes, 4), np.float32)
    samples = []
    names = list(class_names) if class_names else [str(k) for k in range(1, num_classes + 1)]
    empty = []
    for k in range(1, num_classes + 1):
        sel = (classes == k) & (overlaps > min_overlap)
        samples.append(int(sel.sum()))
        if sel.sum() < 2:
            empty.append(names[k - 1])
            continue
        t = encode_deltas(gt_boxes[sel].astype(np.float64), boxes[sel].astype(np.float64))
        mu, sd = t.mean(0), t.std(0) + 1e-3  # the code adds 0.001 to the eigenvalues likewise
        ridge = Ridge(alpha=lam, fit_intercept=True)
        ridge.fit(features[sel].astype(np.float64), (t - mu) / sd)
        # undo the standardisation inside the linear map: t = x @ (W sd) + (b sd + mu)
        weight[k - 1] = (ridge.coef_.T * sd[None, :]).astype(np.float32)
        bias[k - 1] = (ridge.intercept_ * sd + mu).astype(np.float32)
    if empty:
        logger.warning(
            "box regression: fewer than 2 regions with IoU > %.1f for %s: their boxes are not refined",
            min_overlap,
            ", ".join(empty),
        )
    return BoxRegressor(weight, bias, samples)
