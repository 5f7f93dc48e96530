import math

import numpy as np
import pytest

from detkit.data.dataset import DetectionDataset
from detkit.evaluation.voc import VOC07_RECALL_THRESHOLDS, voc_ap, voc_evaluate, voc_iou
from detkit.structures import ImageRecord


def make_dataset(images, class_names=("a", "b")):
    """images: list of (image_id, boxes (internal xyxy), labels, difficult)."""
    records = [
        ImageRecord(
            image_id=i, file_name=f"/nonexistent/{i}.jpg", width=500, height=400, boxes=b, labels=lab, difficult=d
        )
        for i, b, lab, d in images
    ]
    return DetectionDataset(records=records, class_names=list(class_names), native_offset=1.0)


def det(boxes, scores, labels):
    return {
        "boxes": np.asarray(boxes, float).reshape(-1, 4),
        "scores": np.asarray(scores, float),
        "labels": np.asarray(labels, np.int64),
    }


# ---------------------------------------------------------------------------------------
# Reference: the devkit's VOCevaldet.m as py-faster-rcnn's voc_eval does it, written from
# the description with plain loops: one class at a time, detections in the order of a
# detection file (record order, then within the image), sorted by -score, each detection
# compared with every ground-truth box of its image one by one with "+1" inclusive-pixel
# areas, matched when the best overlap is > the threshold (py-faster-rcnn; the MATLAB file
# says >=), difficult boxes "don't care", taken flags R["det"].
# ---------------------------------------------------------------------------------------
def reference_voc_eval(dataset, dets, label, ovthresh, use_07_metric):
    class_recs, npos = {}, 0
    for rec in dataset.records:
        keep = rec.labels == label
        bbox = rec.boxes[keep].astype(np.float64)
        bbox[:, :2] += 1.0  # back to the XML's inclusive pixels
        difficult = rec.difficult[keep]
        class_recs[rec.image_id] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(bbox)}
        npos += int(np.sum(~difficult))

    image_ids, confidence, BB = [], [], []
    for rec in dataset.records:
        if rec.image_id not in dets:
            continue
        d = dets[rec.image_id]
        for box, score, lab in zip(d["boxes"], d["scores"], d["labels"]):
            if lab == label:
                image_ids.append(rec.image_id)
                confidence.append(float(score))
                BB.append([float(box[0]) + 1.0, float(box[1]) + 1.0, float(box[2]), float(box[3])])
    confidence = np.array(confidence)
    BB = np.array(BB).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence, kind="mergesort")
    BB = BB[sorted_ind]
    image_ids = [image_ids[x] for x in sorted_ind]

    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d]
        ovmax, jmax = -np.inf, -1
        for j, bbgt in enumerate(R["bbox"]):
            iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1.0
            ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1.0
            if iw > 0 and ih > 0:
                ua = (
                    (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                    + (bbgt[2] - bbgt[0] + 1.0) * (bbgt[3] - bbgt[1] + 1.0)
                    - iw * ih
                )
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    if npos == 0:
        return float("nan")
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return reference_voc_ap(rec, prec, use_07_metric)


def reference_voc_ap(rec, prec, use_07_metric):
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    ap = 0.0
    for i in range(mrec.size - 1):
        if mrec[i + 1] != mrec[i]:
            ap += (mrec[i + 1] - mrec[i]) * mpre[i + 1]
    return ap


def random_case(seed):
    """A random dataset + detections with the awkward parts: integer or float boxes, GT-free
    images, detections on them, duplicates of one box, difficult boxes, tied scores."""
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(1, 4))
    integer = seed % 2 == 0

    def boxes(n):
        xy = rng.uniform(0, 80, (n, 2))
        wh = rng.uniform(1, 40, (n, 2))
        b = np.concatenate([xy, xy + wh], axis=1)
        return np.round(b) if integer else b

    images, dets = [], {}
    for i in range(int(rng.integers(1, 9))):
        n_gt = int(rng.integers(0, 5))
        gt = boxes(n_gt)
        labels = rng.integers(1, num_classes + 1, n_gt)
        images.append((f"img{i}", gt, labels, rng.random(n_gt) < 0.2))
        if rng.random() < 0.15:
            continue  # an image without detections
        n_det = int(rng.integers(0, 8))
        # jittered copies of GT (to get matches near the threshold) plus random boxes
        near = gt[rng.integers(0, n_gt, n_det)] + rng.normal(0, 4, (n_det, 4)) if n_gt else boxes(n_det)
        if integer:
            near = np.round(near)
        d = np.where(rng.random((n_det, 1)) < 0.7, near, boxes(n_det))
        if integer and n_gt and rng.random() < 0.5:
            # a GT box stretched to twice its width: IoU exactly 0.5 (not a match)
            g = gt[int(rng.integers(0, n_gt))]
            d = np.concatenate([d, [[g[0], g[1], 2 * g[2] - g[0], g[3]]]])
        if n_det and rng.random() < 0.4:  # exact duplicates of one detection
            d = np.concatenate([d, np.repeat(d[:1], 2, axis=0)])
        # scores from a small set, so that ties happen, across and within images
        scores = rng.choice([0.9, 0.8, 0.5, 0.3], len(d)) if rng.random() < 0.5 else rng.random(len(d))
        # keep boxes valid (x2 >= x1): jitter may swap them
        d = np.concatenate([np.minimum(d[:, :2], d[:, 2:]), np.maximum(d[:, :2], d[:, 2:])], 1)
        dets[f"img{i}"] = det(d, scores, rng.integers(1, num_classes + 1, len(d)))
    names = [f"c{k}" for k in range(1, num_classes + 1)]
    return make_dataset(images, names), dets


@pytest.mark.parametrize("seed", range(60))
def test_matches_reference_voc_eval_on_random_cases(seed):
    dataset, dets = random_case(seed)
    for metric, use_07 in (("voc07", True), ("voc", False)):
        for thresh in (0.5, 0.7):
            result = voc_evaluate(dataset, dets, metric=metric, iou_thresh=thresh)
            expected = [reference_voc_eval(dataset, dets, k, thresh, use_07) for k in range(1, dataset.num_classes + 1)]
            got = [result["per_class"][n] for n in dataset.class_names]
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9, equal_nan=True)
            valid = [e for e in expected if not math.isnan(e)]
            if valid:
                assert result["mAP"] == pytest.approx(np.mean(valid), abs=1e-9)
            else:
                assert math.isnan(result["mAP"])


def test_random_cases_exercise_the_hard_parts():
    # Guards the test above against a generator that stopped producing the awkward cases.
    ties = exact_half = ignored = 0
    for seed in range(60):
        dataset, dets = random_case(seed)
        all_scores = np.concatenate([d["scores"] for d in dets.values()] + [np.zeros(0)])
        ties += len(all_scores) - len(np.unique(all_scores))
        for rec in dataset.records:
            if rec.image_id in dets and len(rec.boxes):
                gt = rec.boxes.astype(float)
                gt[:, :2] += 1
                d = dets[rec.image_id]["boxes"].copy()
                d[:, :2] += 1
                iou = voc_iou(d, gt)
                exact_half += int((iou == 0.5).sum())
                ignored += int(((iou > 0.5) & rec.difficult[None, :]).sum())
    assert ties > 20 and ignored > 3
    assert exact_half >= 1, "integer boxes should sometimes hit IoU == 0.5 exactly"


def test_voc_iou_uses_inclusive_pixels():
    # Inclusive boxes (1,1)-(10,10) and (6,6)-(15,15) are 10x10 = 100 pixels each; they share
    # pixels 6..10 in x and y: 5 * 5 = 25. IoU = 25 / (100 + 100 - 25) = 1/7.
    # (Without the +1 it would be 16 / (81 + 81 - 16) = 16/146.)
    iou = voc_iou(np.array([[1, 1, 10, 10]]), np.array([[6, 6, 15, 15], [11, 11, 20, 20]]))
    assert iou.shape == (1, 2)
    assert iou[0, 0] == pytest.approx(1 / 7, abs=1e-12)
    assert iou[0, 1] == 0.0  # touching corners, no shared pixel


def test_voc_ap_toy_curve_07_and_area_differ():
    # Two objects; detections in score order: TP, FP, TP.
    # recall    = [1/2, 1/2, 1]     precision = [1, 1/2, 2/3]
    # area (VOC2010+): envelope precision = [1, 2/3(at rec .5 after the FP), 2/3]; recall steps
    #   0 -> .5 at precision 1 and .5 -> 1 at precision 2/3: .5 * 1 + .5 * 2/3 = 5/6.
    # 11-point (VOC2007): t = 0, .1, .2, .3, .4, .5 reach max precision 1 (6 points);
    #   t = .6, .7, .8, .9, 1 only see recall 1 with precision 2/3 (5 points):
    #   (6 * 1 + 5 * 2/3) / 11 = 28/33.
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(5 / 6, abs=1e-12)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(28 / 33, abs=1e-12)


def test_voc_ap_empty_curve_is_zero():
    assert voc_ap(np.zeros(0), np.zeros(0), True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), False) == 0.0


def test_voc07_thresholds_keep_py_faster_rcnn_rounding():
    # A recall of exactly 3/10 does not reach np.arange's 0.30000000000000004; that is what
    # py-faster-rcnn (and detectron2 / mmdetection) compute, so we do the same.
    assert VOC07_RECALL_THRESHOLDS[3] > 0.3
    rec, prec = np.array([0.3]), np.array([1.0])
    assert voc_ap(rec, prec, True) == pytest.approx(3 / 11, abs=1e-12)  # t = 0, .1, .2 only


def test_end_to_end_toy_pr_curve():
    # Class "a" has two objects in one image (internal xyxy); detections:
    # 0.9 on object 1 (TP), 0.8 elsewhere (FP), 0.7 on object 2 (TP) -> the toy curve above.
    gt = [[0, 0, 10, 10], [50, 50, 70, 70]]
    dataset = make_dataset([("x", gt, [1, 1], [False, False])])
    dets = {"x": det([[0, 0, 10, 10], [100, 100, 120, 120], [50, 50, 70, 70]], [0.9, 0.8, 0.7], [1, 1, 1])}
    r07 = voc_evaluate(dataset, dets, metric="voc07")
    r12 = voc_evaluate(dataset, dets, metric="voc")
    assert r07["per_class"]["a"] == pytest.approx(28 / 33, abs=1e-12)
    assert r12["per_class"]["a"] == pytest.approx(5 / 6, abs=1e-12)
    # class "b" has no ground truth: NaN, and the mean is over "a" only
    assert math.isnan(r07["per_class"]["b"]) and r07["num_gt"] == {"a": 2, "b": 0}
    assert r07["mAP"] == pytest.approx(28 / 33, abs=1e-12)
    np.testing.assert_allclose(r07["pr"]["a"][0], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(r07["pr"]["a"][1], [1.0, 0.5, 2 / 3])
    assert r07["metric"] == "voc07" and r12["metric"] == "voc"


def test_iou_exactly_at_threshold_is_not_a_match():
    # internal (0,0,10,10) = inclusive 1..10 x 1..10 (100 px); detection (0,0,10,5) = 10 x 5
    # = 50 px, all inside: IoU = 50 / 100 = 0.5, not > 0.5 -> FP, AP 0.
    dataset = make_dataset([("x", [[0, 0, 10, 10]], [1], [False])])
    dets = {"x": det([[0, 0, 10, 5]], [1.0], [1])}
    assert voc_evaluate(dataset, dets)["per_class"]["a"] == 0.0
    # one pixel taller: 10 x 6 = 60 px, IoU 0.6 -> TP, AP 1
    dets = {"x": det([[0, 0, 10, 6]], [1.0], [1])}
    assert voc_evaluate(dataset, dets)["per_class"]["a"] == pytest.approx(1.0)


def test_difficult_is_ignored_and_duplicates_are_false_positives():
    gt = [[0, 0, 10, 10], [50, 50, 70, 70]]
    dataset = make_dataset([("x", gt, [1, 1], [False, True])])
    # 0.9 hits the difficult box (ignored), 0.8 finds object 1 (TP), 0.7 is its duplicate (FP)
    dets = {"x": det([[50, 50, 70, 70], [0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8, 0.7], [1, 1, 1])}
    r = voc_evaluate(dataset, dets, metric="voc")
    assert r["num_gt"]["a"] == 1  # the difficult box does not count
    rec, prec = r["pr"]["a"]
    # the ignored first detection leaves tp = fp = 0 there: precision 0 / eps = 0
    np.testing.assert_allclose(rec, [0.0, 1.0, 1.0])
    np.testing.assert_allclose(prec, [0.0, 1.0, 0.5])
    assert r["per_class"]["a"] == pytest.approx(1.0)  # recall 1 reached at precision 1


def test_no_detections_and_wrong_class_detections():
    dataset = make_dataset([("x", [[0, 0, 10, 10]], [1], [False]), ("y", [[0, 0, 5, 5]], [2], [False])])
    r = voc_evaluate(dataset, {})
    assert r["per_class"] == {"a": 0.0, "b": 0.0} and r["mAP"] == 0.0
    # a perfect box with the wrong label is a FP for "b" (no "b" object in image x)
    r = voc_evaluate(dataset, {"x": det([[0, 0, 10, 10]], [0.9], [2]), "y": det([[0, 0, 5, 5]], [0.8], [2])})
    assert r["per_class"]["a"] == 0.0
    # "b": FP (0.9, image x has no "b") then TP (0.8): rec [0, 1], prec [0, 1/2].
    # 11-point: every t in 0..1 sees recall 1 at precision 1/2 -> 1/2 (area AP is 1/2 too).
    assert r["per_class"]["b"] == pytest.approx(0.5)


def test_score_ties_follow_record_order_not_dict_order():
    # Two images, one object each, equal scores; only one detection is correct. The record
    # order decides which comes first: the correct one ("x") first, or the FP first.
    gt = [[0, 0, 10, 10]]
    images = [("x", gt, [1], [False]), ("y", gt, [1], [False])]
    good, bad = det([[0, 0, 10, 10]], [0.5], [1]), det([[30, 30, 40, 40]], [0.5], [1])
    forward = make_dataset(images)
    backward = make_dataset(images[::-1])
    dets = {"y": bad, "x": good}  # insertion order opposite to the records
    # forward: TP then FP: rec [.5, .5], prec [1, .5]; area AP = .5 * 1 = .5
    assert voc_evaluate(forward, dets, metric="voc")["per_class"]["a"] == pytest.approx(0.5)
    # backward: FP then TP: rec [0, .5], prec [0, .5]; area AP = .5 * .5 = .25
    assert voc_evaluate(backward, dets, metric="voc")["per_class"]["a"] == pytest.approx(0.25)


def test_bad_input_raises_one_line_errors():
    dataset = make_dataset([("x", [[0, 0, 10, 10]], [1], [False])])
    with pytest.raises(ValueError, match="'nope'.*not in dataset"):
        voc_evaluate(dataset, {"nope": det([[0, 0, 1, 1]], [1.0], [1])})
    with pytest.raises(ValueError, match=r"label 3 outside 1\.\.2"):
        voc_evaluate(dataset, {"x": det([[0, 0, 1, 1]], [1.0], [3])})
    with pytest.raises(ValueError, match="shape"):
        voc_evaluate(dataset, {"x": {"boxes": np.zeros((1, 3)), "scores": [1.0], "labels": [1]}})
    with pytest.raises(ValueError, match="unknown VOC metric 'voc12'"):
        voc_evaluate(dataset, {}, metric="voc12")


def test_accepts_torch_detections():
    import torch

    from detkit.structures import Detections

    dataset = make_dataset([("x", [[0, 0, 10, 10]], [1], [False])])
    dets = {"x": Detections(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0.9]), torch.tensor([1]))}
    assert voc_evaluate(dataset, dets)["per_class"]["a"] == pytest.approx(1.0)


def test_many_detections_is_fast():
    # 5k images, 10k detections: the matching must be per image, not per detection x all GT.
    import time

    rng = np.random.default_rng(0)
    images, dets = [], {}
    for i in range(5000):
        xy = rng.uniform(0, 400, (3, 2))
        gt = np.concatenate([xy, xy + rng.uniform(10, 80, (3, 2))], 1)
        labels = rng.integers(1, 3, 3)
        images.append((i, gt, labels, rng.random(3) < 0.1))
        d = gt[[0, 1]] + rng.normal(0, 3, (2, 4))
        dets[i] = det(d, rng.random(2), labels[[0, 1]])
    dataset = make_dataset(images)
    start = time.perf_counter()
    result = voc_evaluate(dataset, dets)
    elapsed = time.perf_counter() - start
    print(f"voc_evaluate: 10k detections on 5k images in {elapsed:.3f}s")
    assert 0.3 < result["mAP"] < 1.0
    assert elapsed < 10.0, f"voc_evaluate took {elapsed:.2f}s for 10k detections"


def shared_dir():
    import os
    from pathlib import Path

    env = os.environ.get("DETKIT_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared"


def test_matches_reference_on_real_bccd_annotations():
    # The real XML boxes (integer, 1-based inclusive) with detector-like jittered copies as
    # detections; some objects marked difficult (BCCD has none) to exercise that path.
    import xml.etree.ElementTree as ET

    root = shared_dir() / "data" / "BCCD"
    if not (root / "ImageSets" / "Main" / "test.txt").is_file():
        pytest.skip(f"BCCD not found under {root}")
    names = ["RBC", "WBC", "Platelets"]
    rng = np.random.default_rng(0)
    images, dets = [], {}
    for image_id in (root / "ImageSets" / "Main" / "test.txt").read_text().split():
        tree = ET.parse(root / "Annotations" / f"{image_id}.xml")
        boxes, labels = [], []
        for obj in tree.findall("object"):
            bb = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (int(float(bb.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([xmin - 1, ymin - 1, xmax, ymax])  # detkit's convention
            labels.append(names.index(obj.find("name").text.strip()) + 1)
        boxes = np.array(boxes, float).reshape(-1, 4)
        images.append((image_id, boxes, labels, rng.random(len(labels)) < 0.05))
        keep = rng.random(len(boxes)) < 0.8
        d = np.round(boxes[keep] + rng.normal(0, 6, (int(keep.sum()), 4)))
        d = np.concatenate([np.minimum(d[:, :2], d[:, 2:]), np.maximum(d[:, :2], d[:, 2:])], 1)
        lab = np.array(labels)[keep]
        flip = rng.random(len(lab)) < 0.1  # some wrong classes
        lab[flip] = rng.integers(1, 4, int(flip.sum()))
        dets[image_id] = det(d, np.round(rng.random(len(d)), 2), lab)  # 2 decimals: many ties
    dataset = make_dataset(images, names)
    for metric, use_07 in (("voc07", True), ("voc", False)):
        result = voc_evaluate(dataset, dets, metric=metric)
        expected = [reference_voc_eval(dataset, dets, k, 0.5, use_07) for k in (1, 2, 3)]
        got = [result["per_class"][n] for n in names]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
        assert 0.3 < result["mAP"] < 0.95  # a plausible detector, not a degenerate case
