"""Tests of detkit.modeling.heads.base with a head the base was designed for but that is not
Fast R-CNN: raw per-class scores without a background column (R-CNN's linear SVMs) and no box
regressor (deltas None), a predict that reads the image itself, and the abstract parts a
subclass must define."""

import pytest
import torch

from detkit.modeling.box_ops import BalancedSampler, BoxCoder, Matcher
from detkit.modeling.heads.base import RoIHeadBase, class_deltas
from detkit.structures import ImageList, Proposals, Target


class RawScoreHead(RoIHeadBase):
    """K = 2 classes; score of class k = the mean image intensity inside the box times w_k + b_k
    (an SVM-like raw score, may be negative); no regression."""

    def __init__(self, **kw):
        super().__init__(2, BoxCoder((10.0, 10.0, 5.0, 5.0)), Matcher([0.5], [0, 1]), BalancedSampler(8, 0.5), **kw)
        self.w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        self.b = torch.nn.Parameter(torch.tensor([0.0, 0.5]))
        self.seen_images = []

    @property
    def class_agnostic(self) -> bool:
        return True

    def predict(self, images, features, boxes):
        self.seen_images.append(images)
        means = []
        for i, b in enumerate(boxes):
            for x1, y1, x2, y2 in b.round().long().tolist():
                means.append(images.tensor[i, 0, y1:y2, x1:x2].mean())
        m = torch.stack(means) if means else torch.zeros(0)
        return m[:, None] * self.w + self.b, None

    def class_scores(self, class_outputs):
        return class_outputs  # raw scores, no softmax, no background column

    def losses(self, class_outputs, deltas, labels, box_targets):
        assert deltas is None
        return {"loss_cls": class_outputs.sum() * 0 + labels.float().mean()}


def _image():
    t = torch.zeros(1, 3, 40, 60)
    t[0, 0, 10:20, 10:30] = 2.0  # a bright box
    return ImageList(t, [(40, 60)])


BOXES = torch.tensor([[10.0, 10.0, 30.0, 20.0], [40.0, 20.0, 60.0, 40.0], [5.0, 5.0, 70.0, 50.0]])


def test_raw_scores_and_no_regressor():
    head = RawScoreHead(score_thresh=-1.0, nms_thresh=0.5).eval()
    images = _image()
    (det,), losses = head(images, {}, [Proposals(BOXES, torch.ones(3))])
    assert losses == {} and head.seen_images[-1] is images  # predict gets the images
    # box 0: mean 2 -> scores (2, -1.5); box 1: mean 0 -> (0, 0.5); box 2 (clipped to
    # [5, 5, 60, 40]): mean 400 / 1925 = 0.2078 -> (0.2078, 0.2922). Threshold -1 keeps all
    # but class 2 of box 0 (-1.5). Class 1: box 0 (2) vs box 2 (IoU 200 / 1925 < 0.5) kept;
    # class 2: box 1 (0.5) and box 2 (0.29; IoU 400 / 1925) kept.
    m2 = 400.0 / 1925.0
    expected = sorted([(2.0, 1), (0.0, 1), (m2, 1), (0.5, 2), (0.5 - m2, 2)], reverse=True)
    assert [(round(s, 4), lab) for s, lab in zip(det.scores.tolist(), det.labels.tolist())] == [
        (round(s, 4), lab) for s, lab in expected
    ]
    # no regressor: every detection is a (clipped) proposal box
    clipped = torch.tensor([[10.0, 10.0, 30.0, 20.0], [40.0, 20.0, 60.0, 40.0], [5.0, 5.0, 60.0, 40.0]])
    for box in det.boxes:
        assert any(torch.equal(box, c) for c in clipped)


def test_validation_loss_in_eval_mode_and_width_check():
    head = RawScoreHead().eval()
    target = Target(torch.tensor([[10.0, 10.0, 30.0, 20.0]]), torch.tensor([1]))
    dets, losses = head(_image(), {}, [Proposals(BOXES, torch.ones(3))], [target])
    assert set(losses) == {"loss_cls"} and len(dets) == 1
    # outputs that do not fit K are refused, not silently mis-split
    with pytest.raises(ValueError, match="expected 4 box values and 2 class scores per region, got 4 and 3"):
        head.inference(torch.zeros(3, 3), None, [BOXES], [(40, 60)])


def test_a_head_must_define_its_parts():
    class Incomplete(RoIHeadBase):
        def predict(self, images, features, boxes):
            return torch.zeros(0), None

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(2, BoxCoder(), Matcher([0.5], [0, 1]), BalancedSampler(8, 0.5))


def test_class_deltas_picks_each_rows_class():
    deltas = torch.arange(24.0).view(2, 12)  # K = 3
    torch.testing.assert_close(
        class_deltas(deltas, torch.tensor([3, 1]), False), torch.tensor([[8.0, 9, 10, 11], [12, 13, 14, 15]])
    )
    torch.testing.assert_close(class_deltas(deltas[:, :4], torch.tensor([3, 1]), True), deltas[:, :4])
