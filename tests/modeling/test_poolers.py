"""Tests of detkit.modeling.poolers: FPN level assignment (eq. 1, by hand), RoIPooler
against torchvision.ops (MultiScaleRoIAlign, roi_pool, roi_align) as the independent
reference, and sparse_roi_align's forward and backward against torchvision.ops.roi_align."""

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align, roi_pool

from detkit.modeling import poolers
from detkit.modeling.poolers import RoIPooler, assign_levels, boxes_to_rois, sparse_roi_align


def square(side, x0=0.0):
    return [x0, 0.0, x0 + side, side]


def test_assign_levels_fpn_equation_1():
    # k = floor(4 + log2(sqrt(wh) / 224)) clamped to [2, 5]; index = k - 2
    boxes = torch.tensor(
        [
            square(224),  # k = 4 exactly (eps keeps it from rounding down) -> 2
            square(112),  # 4 - 1 = 3 -> 1
            square(448),  # 4 + 1 = 5 -> 3
            square(223),  # 4 + log2(223/224) = 3.9935 -> 3 -> 1
            square(1),  # 4 - 7.8 -> clamped to 2 -> 0
            square(10000),  # 4 + 5.48 -> clamped to 5 -> 3
            [0.0, 0.0, 112.0, 448.0],  # sqrt(112 * 448) = 224 -> 4 -> 2
            [5.0, 5.0, 5.0, 40.0],  # zero area: log2(0) = -inf -> clamped to 2 -> 0
        ]
    )
    assert assign_levels(boxes, 2, 5).tolist() == [2, 1, 3, 1, 0, 3, 2, 0]
    # other canonical settings: 224 at level 5 in a P3..P6 pyramid -> 5 - 3 = 2
    assert assign_levels(torch.tensor([square(224)]), 3, 6, 224.0, 5).tolist() == [2]


def test_boxes_to_rois_layout():
    rois = boxes_to_rois([torch.tensor([[1.0, 2, 3, 4]]), torch.zeros(0, 4), torch.tensor([[5.0, 6, 7, 8]] * 2)])
    assert rois.tolist() == [[0, 1, 2, 3, 4], [2, 5, 6, 7, 8], [2, 5, 6, 7, 8]]


def test_pooler_constructor_checks():
    with pytest.raises(ValueError, match="unknown pooler kind"):
        RoIPooler(kind="warp")
    with pytest.raises(ValueError, match="powers of 1/2"):
        RoIPooler(scales=(1 / 12,))
    with pytest.raises(ValueError, match="consecutive"):
        RoIPooler(scales=(1 / 4, 1 / 16))
    with pytest.raises(ValueError, match="expects 2 feature levels"):
        RoIPooler(scales=(1 / 4, 1 / 8))([torch.zeros(1, 1, 8, 8)], [torch.zeros(0, 4)])


def _random_boxes(g, n, image, min_side=4.0, max_side=1000.0):
    side = min_side * (max_side / min_side) ** torch.rand(n, 2, generator=g)  # log-uniform sizes
    xy = torch.rand(n, 2, generator=g) * image - side / 4
    return torch.cat([xy, xy + side], 1)


def test_multilevel_pooler_equals_torchvision_multiscale_roi_align():
    g = torch.Generator().manual_seed(0)
    # image 256 x 256 (both images, so torchvision infers the same scales 1/4 .. 1/32)
    feats = OrderedDict((f"p{k}", torch.randn(2, 3, 256 // 2**k, 256 // 2**k, generator=g)) for k in range(2, 6))
    boxes = [_random_boxes(g, 40, 256.0), _random_boxes(g, 25, 256.0)]
    pooler = RoIPooler(7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], kind="roi_align", sampling_ratio=2)
    levels = assign_levels(torch.cat(boxes), 2, 5)
    assert set(levels.tolist()) == {0, 1, 2, 3}  # every level is exercised
    ours = pooler(list(feats.values()), boxes)
    theirs = MultiScaleRoIAlign(list(feats), 7, 2)(feats, boxes, [(256, 256), (256, 256)])
    assert ours.shape == (65, 3, 7, 7)
    torch.testing.assert_close(ours, theirs)
    # and with gradients on the CPU (sparse path) the same numbers
    grad_feats = [f.clone().requires_grad_() for f in feats.values()]
    torch.testing.assert_close(pooler(grad_feats, boxes), theirs, rtol=1e-5, atol=1e-5)


def test_roi_pool_kind_equals_torchvision_roi_pool():
    g = torch.Generator().manual_seed(1)
    feature = torch.randn(2, 4, 20, 30, generator=g)
    boxes = [_random_boxes(g, 10, 300.0, 8, 200), _random_boxes(g, 5, 300.0, 8, 200)]
    ours = RoIPooler(6, [1 / 16], kind="roi_pool")([feature], boxes)
    theirs = roi_pool(feature, boxes_to_rois(boxes), 6, 1 / 16)
    torch.testing.assert_close(ours, theirs)
    ours = RoIPooler(6, [1 / 16], kind="roi_pool")([feature.requires_grad_()], boxes)
    torch.testing.assert_close(ours, theirs)


def test_empty_box_lists():
    feature = torch.randn(2, 4, 8, 8, requires_grad=True)
    for kind in ("roi_align", "roi_pool"):
        out = RoIPooler(5, [1 / 8], kind=kind)([feature], [torch.zeros(0, 4), torch.zeros(0, 4)])
        assert out.shape == (0, 4, 5, 5)
    out = RoIPooler(5, [1 / 4, 1 / 8], kind="roi_align")([feature, feature], [torch.zeros(0, 4)])
    assert out.shape == (0, 4, 5, 5)


# Boxes on a 9 x 11 map (scale 1/2 -> input 18 x 22): inside, partly outside, entirely
# outside, zero width, zero area, inverted, smaller than one cell.
SPARSE_BOXES = torch.tensor(
    [
        [0, 2.0, 3.0, 15.0, 12.0],
        [0, -6.0, -4.0, 8.0, 7.0],
        [1, 14.0, 10.0, 30.0, 25.0],
        [1, 40.0, 40.0, 50.0, 48.0],
        [0, 5.0, 2.0, 5.0, 10.0],
        [1, 7.0, 7.0, 7.0, 7.0],
        [0, 12.0, 9.0, 6.0, 3.0],
        [1, 3.3, 4.1, 3.9, 4.6],
        [0, 0.0, 0.0, 22.0, 18.0],
    ],
    dtype=torch.float64,
)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_sparse_roi_align_forward_and_backward_equal_torchvision(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    upstream = torch.randn(len(SPARSE_BOXES), 3, 4, 4, generator=g, dtype=torch.float64)
    f1 = base.clone().requires_grad_()
    f2 = base.clone().requires_grad_()
    ours = sparse_roi_align(f1, SPARSE_BOXES, 4, 0.5, sampling_ratio, aligned)
    theirs = roi_align(f2, SPARSE_BOXES, 4, 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    (ours * upstream).sum().backward()
    (theirs * upstream).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-10, atol=1e-12)
    # the cases are not vacuous: the outside box pools zeros, the others do not
    assert ours[3].abs().max() == 0
    assert ours[0].abs().max() > 0 and ours[1].abs().max() > 0


def test_transposed_csr_by_hand():
    # W (3 x 4) from per_row = 2 entries per row, row r taking entries 2r and 2r + 1:
    #   row 0: 0.5 * F[2] + 0.25 * F[0]   row 1: 1.0 * F[2] + 2.0 * F[2] (a repeated pixel)
    #   row 2: 0.75 * F[1] + 0.0 * F[0]
    cols = torch.tensor([2, 0, 2, 2, 1, 0])
    weights = torch.tensor([0.5, 0.25, 1.0, 2.0, 0.75, 0.0])
    w_t = poolers._transposed_csr(cols, weights, 2, (3, 4))
    expected = torch.tensor(
        [
            [0.25, 0.0, 0.0],  # F[0] feeds row 0 with 0.25 (and row 2 with 0)
            [0.0, 0.0, 0.75],
            [0.5, 3.0, 0.0],  # the repeated pixel's weights summed
            [0.0, 0.0, 0.0],  # F[3] feeds nothing
        ]
    )
    assert w_t.layout == torch.sparse_csr and w_t.shape == (4, 3)
    torch.testing.assert_close(w_t.to_dense(), expected)
    # the product the backward pass takes: W^T @ dOut
    upstream = torch.tensor([[1.0, -1.0], [2.0, 0.5], [4.0, 3.0]])
    torch.testing.assert_close(w_t @ upstream, expected @ upstream)


def test_sparse_roi_align_gradcheck():
    g = torch.Generator().manual_seed(3)
    feature = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.2, 0.7, 8.3, 9.1], [0, -2.0, 3.0, 4.0, 12.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: sparse_roi_align(f, rois, 3, 0.5, 2, True), (feature,))


def test_sparse_roi_align_rejects_adaptive_sampling_and_handles_no_rois():
    with pytest.raises(ValueError, match="sampling_ratio"):
        sparse_roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, 1.0, 0)
    out = sparse_roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(0, 5), 2, 1.0, 2)
    assert out.shape == (0, 3, 2, 2)


def test_sparse_path_only_for_cpu_training(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[2:])
        return sparse_roi_align(*args, **kwargs)

    monkeypatch.setattr(poolers, "sparse_roi_align", spy)
    feature = torch.randn(1, 2, 8, 8)
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 20.0]])]
    expected = roi_align(feature, boxes_to_rois(boxes), 3, 0.25, 2, False)

    out = RoIPooler(3, [1 / 4], sampling_ratio=2)([feature], boxes)
    assert calls == [(3, 0.25, 2, False)]  # CPU + fixed sampling ratio: sparse (inference too)
    torch.testing.assert_close(out, expected)

    out = RoIPooler(3, [1 / 4], sampling_ratio=2)([feature.clone().requires_grad_()], boxes)
    assert len(calls) == 2  # and in training
    torch.testing.assert_close(out, expected)

    RoIPooler(3, [1 / 4], sampling_ratio=0)([feature.clone().requires_grad_()], boxes)
    RoIPooler(3, [1 / 4], kind="roi_pool")([feature.clone().requires_grad_()], boxes)
    assert len(calls) == 2  # adaptive sampling and roi_pool never take the sparse path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_path_not_used_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(poolers, "sparse_roi_align", lambda *a, **k: calls.append(a))
    feature = torch.randn(1, 2, 8, 8, device="cuda", requires_grad=True)
    out = RoIPooler(3, [1 / 4], sampling_ratio=2)([feature], [torch.tensor([[0.0, 0, 30, 20]], device="cuda")])
    assert calls == [] and out.shape == (1, 2, 3, 3)


@pytest.mark.parametrize("cpu_sparse", [True, False])
def test_multilevel_pooler_gradients_equal_torchvision_multiscale_roi_align(cpu_sparse):
    # Forward values and the gradients with respect to every level's features, for boxes
    # spread over P2..P5, on our sparse CPU kernel and on torchvision's.
    g = torch.Generator().manual_seed(4)
    shapes = [(2, 3, 256 // 2**k, 256 // 2**k) for k in range(2, 6)]
    base = [torch.randn(*s, generator=g) for s in shapes]
    big = torch.tensor([[-40.0, -60.0, 500.0, 470.0]])  # sqrt(wh) > 448: P5
    boxes = [_random_boxes(g, 30, 256.0), torch.cat([_random_boxes(g, 19, 256.0), big])]
    assert set(assign_levels(torch.cat(boxes), 2, 5).tolist()) == {0, 1, 2, 3}
    upstream = torch.randn(50, 3, 7, 7, generator=g)

    ours_in = [b.clone().requires_grad_() for b in base]
    ours = RoIPooler(7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio=2, cpu_sparse=cpu_sparse)(ours_in, boxes)
    (ours * upstream).sum().backward()

    theirs_in = OrderedDict((f"p{k + 2}", b.clone().requires_grad_()) for k, b in enumerate(base))
    theirs = MultiScaleRoIAlign(list(theirs_in), 7, 2)(theirs_in, boxes, [(256, 256), (256, 256)])
    (theirs * upstream).sum().backward()

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for level, (a, b) in enumerate(zip(ours_in, theirs_in.values())):
        assert b.grad.abs().sum() > 0, level  # every level receives gradient
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=f"level {level}")


def test_degenerate_boxes_get_a_level_and_a_defined_output():
    # An inverted box (negative area) and a NaN box used to get no level on a multi-level
    # pooler (log2 of a negative or NaN area): their rows stayed uninitialised memory.
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(1, 2, 64 // 2**k, 64 // 2**k, generator=g) for k in range(2, 6)]  # strides 4..32
    nan = float("nan")
    boxes = torch.tensor(
        [
            [40.0, 40.0, 8.0, 8.0],  # inverted on both axes (positive "area")
            [40.0, 8.0, 8.0, 50.0],  # inverted on one axis: negative area
            [nan, 4.0, 20.0, 30.0],  # a NaN coordinate (a diverged network)
            [10.0, 10.0, 10.0, 10.0],  # empty
            [0.0, 0.0, 60.0, 60.0],  # a normal box
        ]
    )
    levels = assign_levels(boxes, 2, 5)
    assert levels.tolist() == [0, 0, 0, 0, 0]  # degenerate -> the finest level, as the 60 px box
    for cpu_sparse in (True, False):
        pooler = RoIPooler(3, [1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio=2, cpu_sparse=cpu_sparse)
        out = pooler([f.clone() for f in feats], [boxes])
        assert torch.isfinite(out).all()
        # what torchvision's kernel makes of each box at the finest level, NaN read as 0
        expected = roi_align(feats[0], boxes_to_rois([torch.nan_to_num(boxes, nan=0.0)]), 3, 1 / 4, 2, False)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_roi_pool_refuses_aligned():
    with pytest.raises(ValueError, match="aligned=True is RoIAlign's half-pixel offset"):
        RoIPooler(7, [1 / 16], kind="roi_pool", aligned=True)
    RoIPooler(7, [1 / 16], kind="roi_pool", sampling_ratio=0)  # sampling_ratio: documented as not applying
