import json
import math

import numpy as np
import pytest

from detkit.data.dataset import DetectionDataset
from detkit.evaluation.report import evaluate, format_table, plot_pr_curves, write_result
from detkit.structures import ImageRecord

NAN = float("nan")


def dataset():
    # "RBC" has two objects, "WBC" one, "Platelets/big" none
    records = [
        ImageRecord("x", "/x/x.jpg", 100, 100, [[0, 0, 10, 10], [50, 50, 70, 70]], [1, 1], [False, False]),
        ImageRecord("y", "/x/y.jpg", 100, 100, [[20, 20, 40, 40]], [2], [False]),
    ]
    return DetectionDataset(records, ["RBC", "WBC", "Platelets/big"], native_offset=1.0)


def dets():
    # RBC: TP, FP, TP (the toy curve: VOC07 28/33, VOC 5/6); WBC: one TP
    return {
        "x": {
            "boxes": np.array([[0, 0, 10, 10], [80, 80, 90, 90], [50, 50, 70, 70]], float),
            "scores": np.array([0.9, 0.8, 0.7]),
            "labels": np.array([1, 1, 1]),
        },
        "y": {"boxes": np.array([[20, 20, 40, 40]], float), "scores": np.array([0.6]), "labels": np.array([2])},
    }


def test_evaluate_dispatches():
    r07, r12, rcoco = (evaluate(dataset(), dets(), m) for m in ("voc07", "voc", "coco"))
    assert r07["metric"] == "voc07" and r07["per_class"]["RBC"] == pytest.approx(28 / 33)
    assert r12["metric"] == "voc" and r12["per_class"]["RBC"] == pytest.approx(5 / 6)
    assert rcoco["metric"] == "coco" and rcoco["per_class"]["WBC"] == pytest.approx(1.0)
    assert evaluate(dataset(), dets(), "voc07", iou_thresh=0.99)["per_class"]["WBC"] == pytest.approx(1.0)


def test_evaluate_rejects_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric 'map'; valid metrics: voc07, voc, coco"):
        evaluate(dataset(), dets(), "map")


def test_format_table_voc():
    result = {
        "metric": "voc07",
        "iou_thresh": 0.5,
        "mAP": 0.75,
        "per_class": {"RBC": 0.5, "WBC": 1.0, "Platelets": NAN},
        "num_gt": {"RBC": 10, "WBC": 3, "Platelets": 0},
    }
    assert format_table(result) == "\n".join(
        [
            "VOC2007 11-point AP, IoU > 0.5",
            "class          #gt       AP",
            "---------------------------",
            "RBC             10   0.5000",
            "WBC              3   1.0000",
            "Platelets        0      n/a",
            "---------------------------",
            "mAP             13   0.7500",
        ]
    )


def test_format_table_coco_has_summary_numbers():
    r = evaluate(dataset(), dets(), "coco")
    lines = format_table(r).splitlines()
    assert lines[0] == "COCO AP@[.50:.95]"
    assert 0.5 < r["AP50"] < 1
    assert any(line.split() == ["AP50", f"{r['AP50']:.4f}"] for line in lines)
    assert any(line.split() == ["Platelets/big", "0", "n/a"] for line in lines)
    # fixed width: every class row is as wide as the header
    assert len({len(line) for line in lines[1:6]}) == 1


def test_write_result_voc(tmp_path):
    r = evaluate(dataset(), dets(), "voc07")
    path = write_result(r, tmp_path / "sub" / "result.json")
    data = json.loads(path.read_text())
    assert data["metric"] == "voc07"
    assert data["per_class"] == {"RBC": pytest.approx(28 / 33), "WBC": 1.0, "Platelets/big": None}
    assert data["mAP"] == pytest.approx((28 / 33 + 1) / 2) and 0 <= data["mAP"] <= 1
    assert data["num_gt"] == {"RBC": 2, "WBC": 1, "Platelets/big": 0}
    assert "pr" not in data
    assert "NaN" not in path.read_text()


def test_write_result_coco(tmp_path):
    r = evaluate(dataset(), dets(), "coco")
    data = json.loads(write_result(r, tmp_path / "coco.json").read_text())
    assert data["metric"] == "coco" and data["AP50"] == pytest.approx(r["AP50"])
    assert data["AP75"] == pytest.approx(r["AP75"]) and data["mAP"] == pytest.approx(r["mAP"])
    assert data["APl"] is None and math.isnan(r["APl"])  # no large objects


@pytest.mark.parametrize("metric", ["voc", "coco"])
def test_plot_pr_curves(tmp_path, metric):
    written = plot_pr_curves(evaluate(dataset(), dets(), metric), tmp_path / "plots")
    # one PNG per class with ground truth; the "/" in a class name does not make a folder
    assert sorted(p.name for p in written) == ["pr_RBC.png", "pr_WBC.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_needs_curves():
    with pytest.raises(ValueError, match="no precision/recall curves"):
        plot_pr_curves({"metric": "voc07", "mAP": 0.5, "per_class": {}}, "/tmp")
