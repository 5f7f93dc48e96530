"""R-CNN's SVMs with hard-negative mining and its ridge box regression (detkit.engine.svm),
on synthetic features whose answers are known."""

import logging

import numpy as np
import pytest

from detkit.engine.svm import (
    ImageFeatures,
    SVMSettings,
    _NegativeCache,
    encode_deltas,
    feature_scale,
    fit_box_regressors,
    fit_svm,
    svm_objective,
    train_svms,
)


def test_feature_scale_brings_the_mean_norm_to_20():
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32) * 3
    s = feature_scale(np.linalg.norm(x, axis=1))
    assert np.linalg.norm(x * s, axis=1).mean() == pytest.approx(20.0, rel=1e-5)
    assert feature_scale(np.zeros(3)) == 1.0  # all-zero features: left alone


def test_fit_svm_separates_and_weights_positives():
    rng = np.random.default_rng(1)
    pos = rng.normal(2.0, 0.3, size=(20, 2)).astype(np.float32)
    neg = rng.normal(-2.0, 0.3, size=(200, 2)).astype(np.float32)
    settings = SVMSettings(C=1.0)
    w, b = fit_svm(pos, neg, settings)
    assert ((pos @ w + b) > 0).all() and ((neg @ w + b) < 0).all()
    # the objective is what liblinear minimises: no worse than a scaled-down copy of w
    assert svm_objective(w, b, pos, neg, settings) <= svm_objective(0.5 * w, b, pos, neg, settings) + 1e-6


def test_negative_cache_deduplicates_and_keeps_the_hardest():
    cache = _NegativeCache(dim=1, capacity=3)
    x = np.arange(5, dtype=np.float32)[:, None]
    assert cache.add(x, [(0, i) for i in range(5)]) == 5
    assert cache.add(x[:2], [(0, 0), (0, 1)]) == 0  # already cached
    cache.bound(scores=x[:, 0])
    assert sorted(cache.keys) == [(0, 2), (0, 3), (0, 4)]  # the three highest scores
    assert cache.x[:, 0].tolist() == [2.0, 3.0, 4.0]


def synthetic_images(num_images=6, num_props=60, seed=0):
    """Class 1 lives near +e0, class 2 near +e1; background near 0 with a few 'hard' negatives
    close to class 1. Overlaps: GT rows 1 with their class; proposals carry given IoUs."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        feats, overlaps, gt = [], [], []
        for k in (1, 2):  # one ground-truth box per class
            f = np.zeros(4, np.float32)
            f[k - 1] = 3.0
            feats.append(f + rng.normal(0, 0.2, 4))
            ov = np.zeros(2)
            ov[k - 1] = 1.0
            overlaps.append(ov)
            gt.append(k)
        for j in range(num_props):
            f = rng.normal(0, 0.3, 4)
            ov = np.zeros(2)
            if j < 3:  # hard negatives for class 1: close to it, but IoU < 0.3
                f[0] += 2.0
                ov[0] = 0.2
            elif j < 6:  # ignored for class 1: IoU in [0.3, 0.5)
                f[0] += 2.5
                ov[0] = 0.4
            feats.append(f)
            overlaps.append(ov)
            gt.append(0)
        images.append(ImageFeatures(np.array(feats, np.float32), np.array(overlaps), np.array(gt)))
    return images


def test_train_svms_positives_negatives_and_hard_mining():
    images = synthetic_images()
    loads = []

    def load(i):
        loads.append(i)
        return images[i]

    settings = SVMSettings(C=0.1, max_negatives=50, retrain_limit=40, max_passes=2)
    models = train_svms(load, len(images), 2, settings)
    m1 = models[1]
    assert m1.positives == len(images)  # ground-truth rows only, one per image
    assert m1.negatives <= settings.max_negatives + settings.retrain_limit
    # scores: class-1 ground truth above the hard negatives, which sit above the easy ones
    all_feats = np.concatenate([im.features for im in images])
    gt_rows = np.concatenate([im.gt_class for im in images]) == 1
    scores = all_feats @ m1.weight + m1.bias
    assert scores[gt_rows].min() > 0
    # every negative left in the cache was hard (>= the eviction threshold) under the final model
    assert m1.fits >= 2 and len(m1.hard_per_pass) >= 1
    # the objective is finite and the second class learnt its own direction
    assert np.isfinite(m1.objective) and models[2].weight[1] > 0 and m1.weight[0] > 0
    # at most one pass over the positives and max_passes over the negatives
    assert len(loads) <= len(images) * (1 + settings.max_passes)


def test_only_regions_below_the_negative_iou_become_negatives(monkeypatch):
    """Sec. 2.3: negatives have IoU < 0.3 with every instance of the class; ground truth and
    regions in [0.3, 0.5) are never negatives."""
    rng = np.random.default_rng(5)
    images = []
    for _ in range(3):
        feats = rng.normal(size=(8, 3)).astype(np.float32)
        overlaps = np.array([[1.0], [0.29], [0.3], [0.45], [0.1], [0.0], [0.6], [0.2]])
        images.append(ImageFeatures(feats, overlaps, np.array([1, 0, 0, 0, 0, 0, 0, 0])))
    seen = []
    original = _NegativeCache.add

    def spy(self, x, keys):
        seen.extend(r for _, r in keys)
        return original(self, x, keys)

    monkeypatch.setattr(_NegativeCache, "add", spy)
    train_svms(lambda i: images[i], 3, 1, SVMSettings(max_passes=1))
    assert set(seen) <= {1, 4, 5, 7}  # IoU 0.29, 0.1, 0.0, 0.2
    assert {1, 4, 5, 7} <= set(r for r in seen[:4])  # the first image gives all its negatives


def test_class_without_positives_never_fires(caplog):
    images = synthetic_images(num_images=2)
    for im in images:
        im.gt_class[im.gt_class == 2] = 0  # no ground truth of class 2 anywhere
        im.overlaps[:, 1] = 0.0
    with caplog.at_level(logging.WARNING, logger="detkit"):
        logging.getLogger("detkit").propagate = True
        models = train_svms(lambda i: images[i], 2, 2, SVMSettings(max_passes=1), class_names=["a", "b"])
    assert models[2].bias == float("-inf") and not models[2].weight.any()
    assert "no positives in the training split for b" in caplog.text


def test_ridge_recovers_a_known_linear_map():
    rng = np.random.default_rng(3)
    m, d = 400, 6
    x = rng.normal(size=(m, d))
    w_true = rng.normal(scale=0.05, size=(d, 4))
    b_true = np.array([0.01, -0.02, 0.05, -0.03])
    deltas = x @ w_true + b_true
    boxes = np.column_stack([rng.uniform(0, 50, m), rng.uniform(0, 50, m)])
    boxes = np.column_stack([boxes, boxes + rng.uniform(20, 60, (m, 2))])
    # ground truth = boxes moved by the deltas (decode)
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + pw / 2 + deltas[:, 0] * pw, boxes[:, 1] + ph / 2 + deltas[:, 1] * ph
    gw, gh = pw * np.exp(deltas[:, 2]), ph * np.exp(deltas[:, 3])
    gt = np.column_stack([cx - gw / 2, cy - gh / 2, cx + gw / 2, cy + gh / 2])
    np.testing.assert_allclose(encode_deltas(gt, boxes), deltas, atol=1e-9)
    classes = np.ones(m, np.int64)
    overlaps = np.full(m, 0.7)
    reg = fit_box_regressors(x.astype(np.float32), boxes, gt, classes, overlaps, num_classes=2, lam=1e-6)
    np.testing.assert_allclose(reg.weight[0], w_true, atol=1e-3)
    np.testing.assert_allclose(reg.bias[0], b_true, atol=1e-3)
    assert reg.samples == [m, 0] and not reg.weight[1].any()  # class 2: no samples, identity
    # lambda = 1000 shrinks the map towards the mean delta
    shrunk = fit_box_regressors(x.astype(np.float32), boxes, gt, classes, overlaps, 2, lam=1000.0)
    assert np.abs(shrunk.weight[0]).sum() < np.abs(reg.weight[0]).sum()


def test_box_regression_uses_only_regions_above_the_overlap_threshold():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    boxes = np.tile([0.0, 0.0, 10.0, 10.0], (10, 1))
    gt = np.tile([1.0, 1.0, 11.0, 11.0], (10, 1))
    overlaps = np.array([0.9] * 5 + [0.6] * 5)  # exactly 0.6 is not > 0.6 (appendix C)
    reg = fit_box_regressors(x, boxes, gt, np.ones(10, np.int64), overlaps, 1)
    assert reg.samples == [5]
    np.testing.assert_allclose(reg.bias[0], [0.1, 0.1, 0.0, 0.0], atol=1e-6)  # constant shift learnt


def test_hard_negatives_are_those_scored_above_minus_one(monkeypatch):
    """After the first image, an image gives only the negatives the current SVM scores above
    -1 (hard_thresh -1.0001: the margin violators), and none twice. The SVM is fixed here (score
    = the first feature) so that the scores are known."""
    import detkit.engine.svm as svm

    monkeypatch.setattr(svm, "fit_svm", lambda x_pos, x_neg, settings: (np.array([1.0, 0.0], np.float32), 0.0))
    first = ImageFeatures(
        np.array([[5.0, 0], [-3.0, 0], [-0.5, 0]], np.float32), np.array([[1.0], [0.0], [0.0]]), np.array([1, 0, 0])
    )
    scores = [-0.99, -1.0, -1.01, -2.0, 0.5, 3.0]
    second = ImageFeatures(np.array([[s, 1.0] for s in scores], np.float32), np.zeros((6, 1)), np.zeros(6, np.int64))
    added = []
    original = _NegativeCache.add

    def spy(self, x, keys):
        added.append([k for k in keys])
        return original(self, x, keys)

    monkeypatch.setattr(_NegativeCache, "add", spy)
    images = [first, second]
    train_svms(lambda i: images[i], 2, 1, SVMSettings(max_passes=2, evict_thresh=-5.0))
    # image 0 (first): all its negatives; image 1: scored > -1.0001 -> -0.99, -1.0, 0.5, 3.0
    assert added[0] == [(0, 1), (0, 2)]
    assert added[1] == [(1, 0), (1, 1), (1, 4), (1, 5)]
    # pass 2: the same hard negatives again are not added twice (the cache knows them)
    new_per_call = []

    def count(self, x, keys):
        n = original(self, x, keys)
        new_per_call.append(n)
        return n

    monkeypatch.setattr(_NegativeCache, "add", count)
    models = train_svms(lambda i: images[i], 2, 1, SVMSettings(max_passes=2, evict_thresh=-5.0))
    assert new_per_call == [2, 4, 0, 0] and models[1].hard_per_pass == [6, 0]  # pass 2 adds nothing new


def test_hard_negative_cache_stays_within_its_memory_cap(monkeypatch):
    """max_negatives bounds the cache of a class: after every fit it holds at most that many
    (the hardest); between fits it grows by at most retrain_limit plus one image's negatives.
    The data here has far more negatives than the cap, so the bound is what keeps it small."""
    rng = np.random.default_rng(7)
    images = []
    for _ in range(12):
        n = 80
        feats = np.concatenate([[[3.0, 0.0]], rng.normal(0, 1.0, (n, 2))]).astype(np.float32)
        overlaps = np.concatenate([[[1.0]], np.zeros((n, 1))])
        images.append(ImageFeatures(feats, overlaps, np.array([1] + [0] * n)))
    settings = SVMSettings(
        C=1.0, max_negatives=60, retrain_limit=50, max_passes=2, evict_thresh=-50.0, hard_thresh=-49.0
    )
    sizes_after_fit, sizes = [], []
    original_refit_keep, original_add = _NegativeCache.bound, _NegativeCache.add

    def bound(self, scores):
        original_refit_keep(self, scores)
        sizes_after_fit.append(len(self.keys))

    def add(self, x, keys):
        out = original_add(self, x, keys)
        sizes.append(len(self.keys))
        return out

    monkeypatch.setattr(_NegativeCache, "bound", bound)
    monkeypatch.setattr(_NegativeCache, "add", add)
    models = train_svms(lambda i: images[i], len(images), 1, settings)
    assert sizes_after_fit and max(sizes_after_fit) == settings.max_negatives  # the cap is reached and held
    assert max(sizes) <= settings.max_negatives + settings.retrain_limit + 80
    assert sum(len(im.features) - 1 for im in images) > 4 * settings.max_negatives  # far more than kept
    assert models[1].negatives <= settings.max_negatives
