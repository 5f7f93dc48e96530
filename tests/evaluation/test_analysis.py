"""Error analysis: a hand-made case where every error type, the confusion matrix and the
mAP gained by fixing each type are worked out by hand; and agreement with the VOC
evaluator on random detections."""

import json

import numpy as np
import pytest

from detkit.data.dataset import DetectionDataset
from detkit.evaluation.analysis import analysis_to_json, analyze_detections, format_errors
from detkit.evaluation.voc import voc_evaluate
from detkit.structures import ImageRecord

# One 200x200 image, classes a (1) and b (2). Boxes are continuous xyxy; the VOC IoU of
# such boxes equals their plain IoU (to_inclusive adds 1 to x1, y1 and +1 to the widths).
GT = [  # box, label, difficult
    ([0, 0, 40, 40], 1, False),  # g0: found by d0 (d1 duplicates it)
    ([100, 0, 140, 40], 1, False),  # g1: found by d7; d6 (class b) lies on it
    ([0, 100, 40, 140], 2, False),  # g2: only d2 (class a) lies on it -> not missed
    ([100, 100, 140, 140], 2, False),  # g3: nothing near -> missed
    ([150, 150, 190, 190], 1, True),  # g4: difficult, d5 ignored
    ([50, 150, 90, 190], 1, False),  # g5: d3 covers half of it (IoU 0.5: not > 0.5)
    ([150, 0, 190, 40], 2, False),  # g6: found by d8
]
DETS = [  # box, label, score, expected type
    ([0, 0, 40, 40], 1, 0.9, "tp"),  # d0
    ([2, 0, 42, 40], 1, 0.8, "duplicate"),  # d1: IoU 0.905 with g0, already found
    ([0, 100, 40, 140], 1, 0.7, "classification"),  # d2: IoU 1 with g2 of class b
    ([50, 150, 70, 190], 1, 0.6, "localization"),  # d3: IoU 0.5 with g5
    ([60, 60, 80, 80], 2, 0.97, "background"),  # d4: touches nothing
    ([150, 150, 190, 190], 1, 0.4, "ignored"),  # d5: on the difficult g4
    ([110, 0, 150, 40], 2, 0.3, "classification"),  # d6: IoU 0.6 with g1 of class a
    ([100, 0, 140, 40], 1, 0.2, "tp"),  # d7
    ([150, 0, 190, 40], 2, 0.95, "tp"),  # d8
]


def hand_case():
    rec = ImageRecord(
        "img",
        "/nonexistent/img.png",
        200,
        200,
        [g[0] for g in GT],
        [g[1] for g in GT],
        [g[2] for g in GT],
    )
    dataset = DetectionDataset([rec], ["a", "b"], native_offset=0.0)
    dets = {
        "img": {
            "boxes": np.array([d[0] for d in DETS], float),
            "labels": np.array([d[1] for d in DETS]),
            "scores": np.array([d[2] for d in DETS]),
        }
    }
    return dataset, dets


def test_hand_made_case_error_counts():
    dataset, dets = hand_case()
    r = analyze_detections(dataset, dets, "voc", score_thresh=0.5)
    assert r["true_positives"] == 3 and r["ignored"] == 1
    assert r["errors"] == {"localization": 1, "classification": 2, "duplicate": 1, "background": 1, "missed": 1}
    assert r["errors_per_class"] == {
        "a": {"localization": 1, "classification": 1, "duplicate": 1, "background": 0, "missed": 0},
        "b": {"localization": 0, "classification": 1, "duplicate": 0, "background": 1, "missed": 1},
    }
    # False positives worst (highest score) first, each with its type.
    types = [(e["score"], e["type"]) for e in r["false_positives"]]
    assert types == [
        (0.97, "background"),
        (0.8, "duplicate"),
        (0.7, "classification"),
        (0.6, "localization"),
        (0.3, "classification"),
    ]
    cls = [e for e in r["false_positives"] if e["type"] == "classification"]
    assert [e["target_label"] for e in cls] == [2, 1]
    assert r["false_positives"][3]["iou"] == pytest.approx(0.5)
    assert [(m["box"], m["label"]) for m in r["missed"]] == [([100.0, 100.0, 140.0, 140.0], 2)]


def test_hand_made_case_ap_and_dap():
    dataset, dets = hand_case()
    r = analyze_detections(dataset, dets, "voc")
    # a: TP FP FP FP (ign) TP over 3 objects -> 1/3 * 1 + 1/3 * 2/5 = 7/15.
    # b: FP TP FP over 3 objects -> 1/3 * 1/2 = 1/6.
    assert r["per_class"]["a"] == pytest.approx(7 / 15)
    assert r["per_class"]["b"] == pytest.approx(1 / 6)
    assert r["mAP"] == pytest.approx(19 / 60)
    assert r["mAP"] == pytest.approx(voc_evaluate(dataset, dets, "voc")["mAP"])
    expected = {
        # d3 moved onto g5 becomes a TP: a = 1/3 + 1/3 * 3/5 + 1/3 * 3/5 = 11/15.
        "localization": (11 / 15 + 1 / 6) / 2 - 19 / 60,
        # d2 relabelled b is a TP on g2 (a: 1/2, b: 4/9); d6 would claim g1, which d7
        # found: removed.
        "classification": (1 / 2 + 4 / 9) / 2 - 19 / 60,
        # d1 removed: a = 1/3 + 1/3 * 1/2 = 1/2.
        "duplicate": (1 / 2 + 1 / 6) / 2 - 19 / 60,
        # d4 removed: b = 1/3.
        "background": (7 / 15 + 1 / 3) / 2 - 19 / 60,
        # g3 leaves the ground truth: b has 2 objects, 1/2 * 1/2.
        "missed": (7 / 15 + 1 / 4) / 2 - 19 / 60,
    }
    assert r["dAP"] == pytest.approx(expected)


def test_hand_made_case_confusion_matrix():
    dataset, dets = hand_case()
    r = analyze_detections(dataset, dets, "voc", score_thresh=0.5)
    # Score >= 0.5: d0 (a, TP g0), d8 (b, TP g6); d2 (a) claims g2 of class b; d4, d1, d3
    # are left over (background row); g1, g5 (a) and g3 (b) are missed (d7 scores 0.2).
    assert r["confusion"].tolist() == [
        [1, 0, 2],
        [1, 1, 1],
        [2, 1, 0],
    ]
    # At score >= 0: d7 finds g1; d6 (b) cannot take g1 any more -> background; d5 on the
    # difficult box is left out.
    r0 = analyze_detections(dataset, dets, "voc", score_thresh=0.0)
    assert r0["confusion"].tolist() == [
        [2, 0, 1],
        [1, 1, 1],
        [2, 2, 0],
    ]


def test_json_and_table():
    dataset, dets = hand_case()
    r = analyze_detections(dataset, dets, "voc07")
    j = json.loads(json.dumps(analysis_to_json(r, dataset)))
    assert j["errors"]["missed"] == 1 and j["classes"] == ["a", "b"]
    assert j["false_positives"][0]["image_id"] == "img" and j["false_positives"][0]["class"] == "b"
    assert j["confusion"] == r["confusion"].tolist() and "pr" not in j
    table = format_errors(r)
    assert "all" in table.splitlines()[-2] and table.splitlines()[-2].split()[1:] == ["1", "2", "1", "1", "1"]


def test_no_detections_all_missed():
    dataset, _ = hand_case()
    r = analyze_detections(dataset, {}, "voc")
    assert r["errors"]["missed"] == 6 and sum(r["errors"].values()) == 6
    assert r["confusion"][:2, 2].tolist() == [3, 3]
    assert r["mAP"] == 0.0


def random_case(rng):
    recs, dets = [], {}
    for i in range(5):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 80, (n, 2))
        b = np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], 1)
        recs.append(ImageRecord(f"i{i}", f"/x/{i}.png", 120, 120, b, rng.integers(1, 4, n), rng.random(n) < 0.15))
        m = int(rng.integers(0, 8))
        if n and m:
            d = b[rng.integers(0, n, m)] + rng.normal(0, 4, (m, 4))
        else:
            xy = rng.uniform(0, 80, (m, 2))
            d = np.concatenate([xy, xy + 20], 1)
        d[:, 2:] = np.maximum(d[:, 2:], d[:, :2] + 1)
        # Scores rounded to one decimal: plenty of ties, whose order must match voc.py's.
        dets[f"i{i}"] = {"boxes": d, "scores": np.round(rng.random(m), 1), "labels": rng.integers(1, 4, m)}
    return DetectionDataset(recs, ["a", "b", "c"], native_offset=1.0), dets


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("metric", ["voc", "voc07"])
def test_matches_the_voc_evaluator(seed, metric):
    dataset, dets = random_case(np.random.default_rng(seed))
    ours = analyze_detections(dataset, dets, metric)
    ref = voc_evaluate(dataset, dets, metric)
    assert ours["per_class"] == pytest.approx(ref["per_class"], nan_ok=True)
    for name, (rec, prec) in ref["pr"].items():
        np.testing.assert_allclose(ours["pr"][name][0], rec)
        np.testing.assert_allclose(ours["pr"][name][1], prec)
    # Every detection is a TP, ignored, or has exactly one error type.
    n = sum(len(d["scores"]) for d in dets.values())
    fp = sum(v for k, v in ours["errors"].items() if k != "missed")
    assert ours["true_positives"] + ours["ignored"] + fp == n
    # Fixing errors never lowers the mAP.
    assert all(v >= -1e-12 for v in ours["dAP"].values() if not np.isnan(v))
