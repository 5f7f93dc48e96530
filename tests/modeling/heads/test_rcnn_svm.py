"""R-CNN's and SPP-net's heads (detkit.modeling.heads.rcnn_svm): the SVM / box-regression
buffers against hand formulas, the fine-tuning vs. test outputs, pool5 of each head against
its pooler run by hand, chunked test-time features equal to one pass, and rcnn_test.m's
per-class top-k before NMS on a hand-made case."""

import pytest
import torch
import torch.nn.functional as F

from detkit.modeling.backbones.tiny import TinyResNet, TinyResNetBody
from detkit.modeling.box_ops import BalancedSampler, Matcher
from detkit.modeling.heads.fast_rcnn import MLPBoxHead
from detkit.modeling.heads.rcnn_svm import LinearBoxRegressor, LinearSVMs, RCNNHead, SPPHead
from detkit.modeling.poolers import SPPPooler, WarpPooler
from detkit.structures import ImageList, Proposals

K = 3


def test_linear_svms_are_the_scaled_linear_map():
    torch.manual_seed(0)
    svms = LinearSVMs(K, 5)
    w, b = torch.randn(K, 5), torch.randn(K)
    b[2] = float("-inf")  # a class without positives
    svms.set(w, b, 0.5)
    x = torch.randn(4, 5)
    out = svms(x)
    for r in range(4):
        for k in range(2):
            assert out[r, k].item() == pytest.approx(float((x[r] * 0.5) @ w[k] + b[k]), abs=1e-5)
    assert torch.isinf(out[:, 2]).all() and (out[:, 2] < 0).all()
    assert bool(svms.fitted)
    assert set(svms.state_dict()) == {"weight", "bias", "scale", "fitted"}  # buffers: in model_final.pt
    with pytest.raises(ValueError, match=r"do not fit \(3, 5\)"):
        svms.set(torch.zeros(3, 4), torch.zeros(3), 1.0)


def test_box_regressor_gives_each_class_its_own_deltas():
    torch.manual_seed(1)
    reg = LinearBoxRegressor(K, 6)
    w, b = torch.randn(K, 6, 4), torch.randn(K, 4)
    reg.set(w, b, 2.0)
    x = torch.randn(5, 6)
    out = reg(x)
    assert out.shape == (5, 4 * K)
    for k in range(K):
        torch.testing.assert_close(out[:, 4 * k : 4 * k + 4], (x * 2.0) @ w[k] + b[k])


def _spp_head(**kw):
    torch.manual_seed(0)
    pooler = SPPPooler([2, 1], stride=16)
    box_head = MLPBoxHead(8 * pooler.num_bins, [16, 16])
    return SPPHead(
        pooler, "c4", 8, box_head, K, matcher=Matcher([0.5], [0, 1]), sampler=BalancedSampler(16, 0.25), **kw
    )


def _rcnn_head(**kw):
    torch.manual_seed(0)
    body = TinyResNetBody(TinyResNet([4, 8, 8, 8], 1, norm="bn", num_stages=3), ["c4"])
    box_head = MLPBoxHead(8 * 2 * 2, [16, 16])
    return RCNNHead(
        WarpPooler(32, 4),
        body,
        box_head,
        K,
        pool_size=2,
        matcher=Matcher([0.5], [0, 1]),
        sampler=BalancedSampler(16, 0.25),
        **kw,
    )


BOXES = [
    torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 12.0, 60.0, 60.0], [0.0, 0.0, 64.0, 48.0]]),
    torch.tensor([[20.0, 8.0, 50.0, 40.0], [30.0, 30.0, 62.0, 62.0]]),
]


def _inputs():
    torch.manual_seed(2)
    images = ImageList(torch.randn(2, 3, 64, 64), [(64, 64), (64, 64)])
    return images, {"c4": torch.randn(2, 8, 4, 4)}


def test_pool5_of_each_head_is_its_pooler_run_by_hand():
    images, features = _inputs()
    spp = _spp_head().eval()
    torch.testing.assert_close(spp.pool5(images, features, BOXES), spp.pooler([features["c4"]], BOXES))
    rcnn = _rcnn_head().eval()
    with torch.no_grad():
        crops = WarpPooler(32, 4)([images.tensor], BOXES)
        expected = F.adaptive_max_pool2d(rcnn.body(crops)["c4"], 2).flatten(1)
        torch.testing.assert_close(rcnn.pool5(images, features, BOXES), expected)
    assert expected.shape == (5, rcnn.pool5_dim) == (5, 32)


@pytest.mark.parametrize("make", [_spp_head, _rcnn_head], ids=["spp", "rcnn"])
def test_test_time_chunks_give_the_features_of_one_pass(make):
    images, features = _inputs()
    whole, chunked = make(region_batch=1000).eval(), make(region_batch=2).eval()
    with torch.no_grad():
        a = whole.region_features(images, features, BOXES)
        b = chunked.region_features(images, features, BOXES)
    for name in ("pool5", "fc7"):
        torch.testing.assert_close(a[name], b[name])
    # no regions at all: empty features of the right widths
    empty = chunked.region_features(images, features, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert empty["pool5"].shape == (0, whole.pool5_dim) and empty["fc7"].shape == (0, 16)


def test_outputs_before_and_after_the_svms():
    images, features = _inputs()
    head = _spp_head()
    logits, deltas = head.predict(images, features, BOXES)  # training: the fine-tuning classifier
    assert logits.shape == (5, K + 1) and deltas is None
    head.eval()
    with torch.no_grad():
        out, deltas = head.predict(images, features, BOXES)
        feats = head.region_features(images, features, BOXES)
        assert out.shape == (5, 2 * K + 1) and deltas is None
        # not fitted yet: the detection scores are the softmax without background
        torch.testing.assert_close(head.class_scores(out), F.softmax(out[:, : K + 1], -1)[:, 1:])
        torch.manual_seed(3)
        head.svms.set(torch.randn(K, 16), torch.randn(K), 0.7)
        head.box_regressor.set(torch.randn(K, head.pool5_dim, 4) * 0.01, torch.zeros(K, 4), 1.0)
        out, deltas = head.predict(images, features, BOXES)
        torch.testing.assert_close(head.class_scores(out), head.svms(feats["fc7"]))
        torch.testing.assert_close(deltas, head.box_regressor(feats["pool5"]))
        # the validation loss still reads the logits
        labels = torch.tensor([0, 1, 2, 3, 0])
        loss = head.losses(out, deltas, labels, torch.zeros(5, 4))
        assert set(loss) == {"loss_cls"}
        torch.testing.assert_close(loss["loss_cls"], F.cross_entropy(out[:, : K + 1], labels))


def test_pool5_svms_read_pool5():
    images, features = _inputs()
    head = _spp_head(svm_features="pool5").eval()
    head.svms.set(torch.ones(K, head.pool5_dim) * 0.01, torch.zeros(K), 1.0)
    with torch.no_grad():
        out, _ = head.predict(images, features, BOXES)
        pool5 = head.region_features(images, features, BOXES, ["pool5"])["pool5"]
    torch.testing.assert_close(head.class_scores(out), head.svms(pool5))


def test_topk_per_class_before_nms():
    """rcnn_test.m: per image and class only the best k regions go on; no score threshold."""
    head = _spp_head(topk_per_class=2, nms_thresh=0.3).eval()
    # five disjoint boxes in one image (NMS removes none); scores for class 1 = 5, 4, 3, 2, 1,
    # class 2 = -1 .. -5 (raw SVM scores can all be negative), class 3 = 1 .. 5
    boxes = torch.tensor([[10.0 * i, 0, 10.0 * i + 8, 8] for i in range(5)])
    svm = torch.stack([torch.arange(5, 0, -1.0), -torch.arange(1, 6.0), torch.arange(1, 6.0)], 1)
    outputs = torch.cat([torch.zeros(5, K + 1), svm], 1)
    (det,) = head.inference(outputs, None, [boxes], [(20, 60)])
    got = sorted(zip(det.labels.tolist(), det.scores.tolist()))
    assert got == [(1, 4.0), (1, 5.0), (2, -2.0), (2, -1.0), (3, 4.0), (3, 5.0)]
    head.topk_per_class = 0  # all
    (det,) = head.inference(outputs, None, [boxes], [(20, 60)])
    assert len(det) == 15


def test_a_head_in_a_model_keeps_its_fits_in_the_state_dict():
    head = _spp_head()
    head.svms.set(torch.ones(K, 16), torch.zeros(K), 3.0)
    state = head.state_dict()
    again = _spp_head()
    assert not bool(again.svms.fitted)
    again.load_state_dict(state)
    assert bool(again.svms.fitted) and float(again.svms.scale) == 3.0
    assert torch.equal(again.svms.weight, torch.ones(K, 16))


def test_images_without_proposals():
    images, features = _inputs()
    head = _rcnn_head().eval()
    with torch.no_grad():
        dets, _ = head(
            images, features, [Proposals(BOXES[0], torch.ones(3)), Proposals(torch.zeros(0, 4), torch.zeros(0))]
        )
    assert len(dets) == 2 and len(dets[1]) == 0 and len(dets[0]) > 0
