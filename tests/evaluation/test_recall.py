import math

import numpy as np
import pytest
import torch

from detkit.data.dataset import DetectionDataset
from detkit.evaluation.recall import dataset_gt_boxes, proposal_recall, recall_curve
from detkit.structures import ImageRecord, Proposals

# Hand-made case, continuous IoU (no +1):
#  image 0: GT A (0,0,10,10); proposals ranked: IoU .5 (10x5 inside), .8 (10x8), 1.0
#  image 1: GT B (0,0,20,20), C (100,100,110,110); proposals: B at .7 (20x14 = 280/400),
#           one far away, C at .6 (10x6)
#  image 2: no GT, some proposals (ignored)
#  image 3: GT D, no proposals (best IoU 0)
# Best IoU per GT [A, B, C, D] among the top N:
#  N=1: [.5, .7, 0, 0]   N=2: [.8, .7, 0, 0]   N=3: [1, .7, .6, 0]
GT = [
    np.array([[0, 0, 10, 10]], float),
    np.array([[0, 0, 20, 20], [100, 100, 110, 110]], float),
    np.zeros((0, 4)),
    np.array([[0, 0, 4, 4]], float),
]
PROPOSALS = [
    np.array([[0, 0, 10, 5], [0, 0, 10, 8], [0, 0, 10, 10]], float),
    np.array([[0, 0, 20, 14], [300, 300, 310, 310], [100, 100, 110, 106]], float),
    np.array([[0, 0, 5, 5]], float),
    np.zeros((0, 4)),
]


def test_recall_and_ar_by_hand():
    r = proposal_recall(GT, PROPOSALS, num_proposals=(1, 2, 3), iou_thresholds=(0.5, 0.7, 0.9))
    assert r["num_gt"] == 4
    # recall = fraction of the 4 GT with best IoU >= t
    assert r["recall"][1] == pytest.approx({0.5: 2 / 4, 0.7: 1 / 4, 0.9: 0.0})
    assert r["recall"][2] == pytest.approx({0.5: 2 / 4, 0.7: 2 / 4, 0.9: 0.0})
    assert r["recall"][3] == pytest.approx({0.5: 3 / 4, 0.7: 2 / 4, 0.9: 1 / 4})
    assert r["AR"] == pytest.approx({1: 0.75 / 3, 2: 1.0 / 3, 3: 1.5 / 3})


def test_default_thresholds_count_an_iou_of_exactly_0_7():
    # np.arange(0.5, 0.951, 0.05) holds 0.7000000000000002; the thresholds are rounded so
    # that B's IoU of exactly 0.7 counts at "0.7" (recall 2/4 with N=2, not 1/4).
    r = proposal_recall(GT, PROPOSALS, num_proposals=(2,))
    assert sorted(r["recall"][2]) == pytest.approx([0.5 + 0.05 * i for i in range(10)])
    assert r["recall"][2][0.7] == pytest.approx(0.5)
    # N=2 best IoUs [.8, .7, 0, 0]: 2 GT up to t=.7 (5 thresholds), 1 GT at .75 and .8,
    # none above: AR = (5 * 2/4 + 2 * 1/4) / 10 = 0.3
    assert r["AR"][2] == pytest.approx(0.3)


def test_more_proposals_than_available_uses_all():
    r = proposal_recall(GT, PROPOSALS, num_proposals=(3, 2000), iou_thresholds=(0.5,))
    assert r["recall"][2000] == r["recall"][3] == {0.5: 0.75}


def test_recall_curve():
    np.testing.assert_allclose(recall_curve(GT, PROPOSALS, [1, 2, 3], iou=0.7), [0.25, 0.5, 0.5])
    # a sequence of thresholds gives AR against the number of proposals
    np.testing.assert_allclose(recall_curve(GT, PROPOSALS, [1, 2, 3], iou=[0.5, 0.7, 0.9]), [0.25, 1 / 3, 0.5])


def test_accepts_tensors_and_proposals_objects():
    props = [Proposals(torch.as_tensor(p, dtype=torch.float32), torch.zeros(len(p))) for p in PROPOSALS]
    gts = [torch.as_tensor(g) for g in GT]
    r = proposal_recall(gts, props, num_proposals=(3,), iou_thresholds=(0.5,))
    assert r["recall"][3][0.5] == pytest.approx(0.75)


def test_no_ground_truth_gives_nan():
    r = proposal_recall([np.zeros((0, 4))], [np.array([[0, 0, 1, 1.0]])], num_proposals=(1,))
    assert r["num_gt"] == 0 and math.isnan(r["AR"][1])


def test_mismatched_lengths_and_bad_counts():
    with pytest.raises(ValueError, match="4 images of ground truth but 3"):
        proposal_recall(GT, PROPOSALS[:3])
    with pytest.raises(ValueError, match="counts must be >= 1"):
        proposal_recall(GT, PROPOSALS, num_proposals=(0,))


def test_dataset_gt_boxes_drops_difficult():
    rec = ImageRecord("x", "x.jpg", 50, 50, [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]], [1, 1, 1], [False, True, False])
    dataset = DetectionDataset([rec, ImageRecord("y", "y.jpg", 5, 5)], ["a"])
    boxes = dataset_gt_boxes(dataset)
    np.testing.assert_array_equal(boxes[0], [[0, 0, 1, 1], [4, 4, 5, 5]])
    assert boxes[1].shape == (0, 4)
