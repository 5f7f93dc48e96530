"""R-CNN's / SPP-net's offline stages (detkit.engine.svm_stages) and their feature cache
(detkit.engine.feature_cache), on three 64 x 64 images whose proposals have hand-computed
IoUs with the ground truth, run through a head whose features are its boxes (so every SVM
sample names the region it came from):

- the sampling thresholds through the stage code: positives are the ground-truth boxes only,
  negatives the proposals below 0.3 IoU with every instance of the class (a difficult one
  included), regression samples the regions above 0.6 IoU with a ground-truth box;
- a class without positives, an image without proposals, a proposal file missing an image;
- the cache round-trips; a corrupt chunk, a cache from another config or other weights and a
  foreign folder are one-line errors, and nothing is overwritten;
- a killed cache stage resumes from its chunks and ends with the cache of an uninterrupted run.
"""

import json
import logging

import cv2
import numpy as np
import pytest
import torch

import detkit.engine.svm as svm_module
from detkit.data.dataset import DetectionDataset
from detkit.data.proposal_files import save_proposals
from detkit.engine.feature_cache import FeatureCache, ImageRegions
from detkit.engine.stages import RunContext
from detkit.engine.svm_stages import (
    SVM_REPORT,
    BoxRegressionStage,
    FeatureCacheStage,
    SVMStage,
    cache_config_fingerprint,
)
from detkit.errors import FeatureCacheError, ProposalFileError
from detkit.modeling.backbones.image import ImageInput
from detkit.modeling.box_ops import BalancedSampler, Matcher
from detkit.modeling.detector import Detector
from detkit.modeling.heads.fast_rcnn import MLPBoxHead
from detkit.modeling.heads.rcnn_svm import ClassicHead
from detkit.modeling.proposals.precomputed import PrecomputedProposals
from detkit.schema import Config
from detkit.structures import ImageRecord

CLASSES = ["a", "b", "c"]  # c never occurs: a class without positives
A = [10.0, 10.0, 30.0, 30.0]  # class a, 20 x 20
B = [36.0, 36.0, 60.0, 60.0]  # class b, 24 x 24
D = [36.0, 4.0, 60.0, 24.0]  # class a, difficult
# Proposals with their IoUs (hand-computed):
P_NEG = [21.0, 10.0, 41.0, 30.0]  # A moved 11 px: IoU 9/31 = 0.290 with A, 70/810 with D, 0 with B
P_IGNORED = [20.5, 10.0, 40.5, 30.0]  # A moved 10.5 px: IoU 9.5/30.5 = 0.311 with A, 63/817 with D
P_DIFFICULT = [36.0, 8.0, 60.0, 28.0]  # D moved 4 px: IoU 384/576 = 0.667 with D (difficult), 0 else
P_FAR = [0.0, 40.0, 12.0, 60.0]  # IoU 0 with every box
P_REG = [38.0, 36.0, 62.0, 60.0]  # B moved 2 px: IoU 528/624 = 0.846 with B, 0 else
PROPOSALS = [P_NEG, P_IGNORED, P_DIFFICULT, P_FAR, P_REG]


class BoxFeatureHead(ClassicHead):
    """pool5 = fc7 = (x1, y1, x2, y2, 64) / 64 of each region: features that name their box."""

    def __init__(self):
        super().__init__(
            MLPBoxHead(5, []), 5, len(CLASSES), Matcher([0.5], [0, 1]), BalancedSampler(8, 0.25), topk_per_class=0
        )

    def pool5(self, images, features, boxes):
        b = torch.cat(boxes) if boxes else torch.zeros(0, 4)
        return torch.cat([b, torch.full((len(b), 1), 64.0)], 1) / 64.0


def boxes_of(x: np.ndarray) -> list:
    """SVM samples (scaled features) -> the boxes they came from, rounded, sorted."""
    return sorted(tuple(np.round(r[:4] / r[4] * 64, 2)) for r in x)


def make_dataset(root, num_images=3):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(num_images):
        path = root / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        records.append(ImageRecord(f"img{i}", str(path), 64, 64, [A, B, D], [1, 2, 1], [False, False, True]))
    return DetectionDataset(records, CLASSES, name="train")


def make_run(tmp_path, proposals=None, images=3, **svm):
    dataset = make_dataset(tmp_path / "data", images)
    table = proposals or {
        r.image_id: (np.array(PROPOSALS, np.float32), np.ones(5, np.float32)) for r in dataset.records
    }
    path = save_proposals(tmp_path / "proposals.npz", table)
    cfg = Config()
    cfg.data.input.min_size_test, cfg.data.input.max_size = 64, 64  # the network input is the image
    cfg.train.device = "cpu"
    s = cfg.model.roi_head.svm
    s.images_per_chunk = 2
    # every negative is "hard" and none is evicted: the last fit of a class sees all of them
    s.hard_thresh, s.evict_thresh, s.max_passes = -1e9, -1e9, 1
    for key, value in svm.items():
        setattr(s, key, value)
    torch.manual_seed(0)
    model = Detector(ImageInput(), PrecomputedProposals(str(path)), BoxFeatureHead())
    return RunContext(cfg, model, dataset, None, tmp_path / "run", CLASSES, device=torch.device("cpu"), progress=False)


def test_sampling_thresholds_through_the_stages(tmp_path, monkeypatch, detkit_log):
    run = make_run(tmp_path)
    FeatureCacheStage().run(run)
    cache = FeatureCache.open(tmp_path / "run" / "feature_cache", cache_config_fingerprint(run.cfg))
    image = cache.image(1)
    # rows: the non-difficult ground truth first, then the proposals
    np.testing.assert_allclose(image.boxes, [A, B] + PROPOSALS)
    assert image.gt_class.tolist() == [1, 2, 0, 0, 0, 0, 0]
    expected_overlaps = [
        [1.0, 0.0, 0.0],  # A
        [0.0, 1.0, 0.0],  # B
        [9 / 31, 0.0, 0.0],  # P_NEG: max(0.290 with A, 0.086 with D)
        [9.5 / 30.5, 0.0, 0.0],
        [384 / 576, 0.0, 0.0],  # P_DIFFICULT: the difficult instance counts
        [0.0, 0.0, 0.0],
        [0.0, 528 / 624, 0.0],
    ]
    np.testing.assert_allclose(image.overlaps, expected_overlaps, atol=1e-6)
    # regression samples: rows whose best IoU with a (non-difficult) ground-truth box >= 0.6
    assert image.reg_rows.tolist() == [0, 1, 6] and image.reg_class.tolist() == [1, 2, 2]
    np.testing.assert_allclose(image.reg_gt, [A, B, B])

    fits = []
    real_fit = svm_module.fit_svm

    def spy(x_pos, x_neg, settings):
        fits.append((boxes_of(x_pos), boxes_of(x_neg)))
        return real_fit(x_pos, x_neg, settings)

    monkeypatch.setattr(svm_module, "fit_svm", spy)
    SVMStage().run(run)
    last = {}
    for pos, neg in fits:
        last[pos[0]] = (pos, neg)  # the last fit of each class (named by its first positive)
    pos_a, neg_a = last[tuple(A)]
    pos_b, neg_b = last[tuple(B)]
    assert pos_a == [tuple(A)] * 3 and pos_b == [tuple(B)] * 3  # ground truth only, not P_REG (IoU 0.85)
    assert neg_a == sorted([tuple(P_NEG), tuple(P_FAR), tuple(P_REG)] * 3)  # < 0.3 with every a
    assert neg_b == sorted([tuple(P_NEG), tuple(P_IGNORED), tuple(P_DIFFICULT), tuple(P_FAR)] * 3)
    assert len(last) == 2  # class c has no positives: never fitted ...
    head = run.model.roi_head
    assert bool(head.svms.fitted) and head.svms.bias[2] == float("-inf")  # ... and never fires
    assert "no positives in the training split for c" in detkit_log.text
    report = json.loads((tmp_path / "run" / SVM_REPORT).read_text())
    assert report["classes"]["c"]["trained"] is False and report["classes"]["a"]["positives"] == 3

    captured = {}
    real_reg = svm_module.fit_box_regressors

    def spy_reg(features, boxes, gt, classes, overlaps, *args, **kw):
        captured.update(boxes=boxes, classes=classes, overlaps=overlaps)
        return real_reg(features, boxes, gt, classes, overlaps, *args, **kw)

    monkeypatch.setattr("detkit.engine.svm_stages.fit_box_regressors", spy_reg)
    BoxRegressionStage().run(run)
    assert captured["classes"].tolist() == [1, 2, 2] * 3
    np.testing.assert_allclose(captured["overlaps"], [1.0, 1.0, 528 / 624] * 3, atol=1e-6)
    assert bool(head.box_regressor.fitted)


def test_images_without_proposals_are_counted_and_keep_their_ground_truth(tmp_path, detkit_log):
    dataset_ids = [f"img{i}" for i in range(3)]
    table = {i: (np.array(PROPOSALS, np.float32), np.ones(5, np.float32)) for i in dataset_ids}
    table["img1"] = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    run = make_run(tmp_path, proposals=table)
    FeatureCacheStage().run(run)
    cache = FeatureCache.open(tmp_path / "run" / "feature_cache", cache_config_fingerprint(run.cfg))
    assert cache.image(1).gt_class.tolist() == [1, 2]  # its positives are still there
    assert cache.manifest["images_without_proposals"] == 1
    assert "1 of 3 training images have no proposals" in detkit_log.text


def test_a_proposal_file_missing_an_image_is_one_line(tmp_path):
    table = {f"img{i}": (np.array(PROPOSALS, np.float32), np.ones(5, np.float32)) for i in (0, 2)}
    run = make_run(tmp_path, proposals=table)
    with pytest.raises(ProposalFileError, match="has no proposals for image 'img1'") as err:
        FeatureCacheStage().run(run)
    assert "\n" not in str(err.value)


def _regions(rng, image_id, rows, k=3, d=6, dp=4):
    n_reg = min(rows, 2)
    return ImageRegions(
        image_id,
        rng.uniform(0, 50, (rows, 4)).astype(np.float32),
        rng.integers(0, k + 1, rows),
        rng.uniform(0, 1, (rows, k)).astype(np.float32),
        rng.normal(size=(rows, d)).astype(np.float16),
        rng.uniform(1, 2, rows).astype(np.float32),
        rng.uniform(1, 2, rows).astype(np.float32),
        np.arange(n_reg),
        rng.normal(size=(n_reg, dp)).astype(np.float16),
        rng.uniform(0, 50, (n_reg, 4)).astype(np.float32),
        rng.integers(1, k + 1, n_reg),
        rng.uniform(0.6, 1, n_reg).astype(np.float32),
        num_proposals=rows,
    )


MANIFEST = dict(
    config_fingerprint="cfg1",
    weights_fingerprint="w1",
    num_images=3,
    images_per_chunk=2,
    num_classes=3,
    feature_dim=6,
    pool5_dim=4,
    dtype="float16",
)


def _write_cache(folder, rng):
    cache = FeatureCache.create_or_resume(folder, MANIFEST)
    images = [_regions(rng, f"i{j}", rows) for j, rows in enumerate([5, 0, 3])]
    cache.write_chunk(0, images[:2])
    cache.write_chunk(1, images[2:])
    cache.finish()
    return images


def test_feature_cache_round_trip(tmp_path):
    images = _write_cache(tmp_path / "cache", np.random.default_rng(0))
    cache = FeatureCache.open(tmp_path / "cache", "cfg1", "w1")
    for j, original in enumerate(images):
        back = cache.image(j)
        assert back.image_id == original.image_id and back.num_proposals == original.num_proposals
        for name in ("boxes", "gt_class", "overlaps", "features", "reg_rows", "reg_features", "reg_gt", "reg_class"):
            np.testing.assert_array_equal(getattr(back, name), getattr(original, name))
        assert back.features.dtype == np.float16
    q = cache.regression_samples()
    np.testing.assert_array_equal(q["boxes"], np.concatenate([im.boxes[im.reg_rows] for im in images]))
    assert cache.manifest["complete"] and cache.manifest["bytes"] == cache.size_bytes() > 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing_array"])
def test_a_corrupt_chunk_is_one_line_naming_it(tmp_path, damage):
    _write_cache(tmp_path / "cache", np.random.default_rng(0))
    chunk = tmp_path / "cache" / "chunk_00001.npz"
    if damage == "garbage":
        chunk.write_bytes(b"not a zip at all")
    elif damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:200])
    else:
        np.savez(chunk, image_ids=np.array(["i2"]))
    cache = FeatureCache.open(tmp_path / "cache", "cfg1", "w1")
    cache.image(0)  # chunk 0 is fine
    with pytest.raises(FeatureCacheError, match="chunk_00001.npz") as err:
        cache.image(2)
    assert "\n" not in str(err.value) and "delete it" in str(err.value)


def test_a_cache_from_another_config_or_weights_is_refused_and_kept(tmp_path):
    folder = tmp_path / "cache"
    _write_cache(folder, np.random.default_rng(0))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FeatureCacheError, match="made for another config") as err:
        FeatureCache.create_or_resume(folder, {**MANIFEST, "config_fingerprint": "cfg2"})
    assert "\n" not in str(err.value)
    with pytest.raises(FeatureCacheError, match="made from other model weights"):
        FeatureCache.create_or_resume(folder, {**MANIFEST, "weights_fingerprint": "w2"})
    with pytest.raises(FeatureCacheError, match="made for another config"):
        FeatureCache.open(folder, "cfg2")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing overwritten
    # a folder of someone else's files is not written into
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FeatureCacheError, match="not a detkit feature cache"):
        FeatureCache.create_or_resume(other, MANIFEST)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    # an unfinished cache is not read
    FeatureCache.create_or_resume(tmp_path / "partial", MANIFEST)
    with pytest.raises(FeatureCacheError, match="incomplete"):
        FeatureCache.open(tmp_path / "partial", "cfg1")


def test_the_cache_stage_refuses_a_cache_of_another_config(tmp_path):
    run = make_run(tmp_path)
    FeatureCacheStage().run(run)
    assert FeatureCacheStage().done(run)
    run.cfg.model.roi_head.svm.max_proposals = 3  # changes what would be cached
    assert not FeatureCacheStage().done(run)
    with pytest.raises(FeatureCacheError, match="made for another config"):
        FeatureCacheStage().run(run)
    run.cfg.model.roi_head.svm.max_proposals = 2000
    run.cfg.model.roi_head.svm.C = 0.5  # an SVM setting: the cache still serves
    assert FeatureCacheStage().done(run)


def test_a_killed_cache_stage_resumes_from_its_chunks(tmp_path, monkeypatch):
    reference = make_run(tmp_path / "a")
    FeatureCacheStage().run(reference)
    run = make_run(tmp_path / "b")
    written = []
    real_write = FeatureCache.write_chunk

    def dies_on_the_second(self, c, images):
        if len(written) == 1:
            raise KeyboardInterrupt
        written.append(c)
        return real_write(self, c, images)

    monkeypatch.setattr(FeatureCache, "write_chunk", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        FeatureCacheStage().run(run)
    assert not FeatureCacheStage().done(run) and written == [0]
    monkeypatch.setattr(
        FeatureCache, "write_chunk", lambda self, c, images: written.append(c) or real_write(self, c, images)
    )
    FeatureCacheStage().run(run)  # resumed: only the missing chunk is computed
    assert written == [0, 1] and FeatureCacheStage().done(run)
    fp = cache_config_fingerprint(run.cfg)
    a = FeatureCache.open(tmp_path / "a" / "run" / "feature_cache", fp)
    b = FeatureCache.open(tmp_path / "b" / "run" / "feature_cache", fp)
    for i in range(3):
        for name in ("boxes", "overlaps", "features", "reg_features"):
            np.testing.assert_array_equal(getattr(a.image(i), name), getattr(b.image(i), name))


def test_svm_stage_reads_no_cache_made_for_other_weights(tmp_path):
    run = make_run(tmp_path)
    FeatureCacheStage().run(run)
    with torch.no_grad():
        run.model.roi_head.predictor.cls_score.weight.add_(1.0)  # "fine-tuned again"
    with pytest.raises(FeatureCacheError, match="other model weights"):
        SVMStage().run(run)


def test_logging_names_the_cache_size(tmp_path, detkit_log):
    run = make_run(tmp_path)
    with detkit_log.at_level(logging.INFO, logger="detkit"):
        FeatureCacheStage().run(run)
    assert "feature cache: 3 images," in detkit_log.text and "KB in" in detkit_log.text
