"""Multi-scale testing (Fast R-CNN sec. 5.2, SPP-net sec. 3.1.2): which pyramid scale a box
gets (hand-computed), outputs put back in the proposals' order with per-axis factors, one
scale giving today's detections bit for bit, a pyramid whose regions all stay at the largest
scale giving them too, a region pooled at a smaller scale getting exactly that level's
prediction, and the Detector's part timing."""

import pytest
import torch

from detkit.config import from_dict
from detkit.data.build import dataset_transforms
from detkit.data.transforms import resize_image
from detkit.modeling.build import build_model
from detkit.modeling.pyramid import (
    PyramidLevel,
    assign_scales,
    build_pyramid,
    pyramid_factors,
    pyramid_predict,
)
from detkit.modeling.timing import PartTimes
from detkit.schema import InputConfig, ModelConfig
from detkit.structures import Geometry, ImageList, Target

PAPER_SCALES = [480, 576, 688, 864, 1200]  # Fast R-CNN sec. 5.2, SPP-net sec. 3.1.2


def test_factors_are_relative_to_the_largest_scale_ascending():
    assert pyramid_factors([1200, 480, 864]) == [0.4, 0.72, 1.0]
    assert pyramid_factors(PAPER_SCALES) == pytest.approx([0.4, 0.48, 688 / 1200, 0.72, 1.0])


def test_which_scale_a_box_gets_hand_computed():
    factors = pyramid_factors(PAPER_SCALES)
    boxes = torch.tensor(
        [
            # 300 x 300 = 90000: scaled areas 14400, 20736, 29584, 46656, 90000; |. - 50176|
            # smallest at 0.72 (3520) -> 864
            [0.0, 0.0, 300.0, 300.0],
            # 224 x 224 at the largest scale is exactly 224^2 -> 1200
            [10.0, 10.0, 234.0, 234.0],
            # 1000 x 1000: 160000 at 0.4 is the closest (109824; 0.48 gives 230400) -> 480
            [0.0, 0.0, 1000.0, 1000.0],
            # 500 x 400 = 200000: 32000 (18176), 46080 (4096), 65739 (15563) -> 576
            [0.0, 0.0, 500.0, 400.0],
            # a tiny box: closest where it is largest -> 1200
            [5.0, 5.0, 15.0, 15.0],
        ]
    )
    assert assign_scales(boxes, factors).tolist() == [3, 4, 0, 1, 4]


def test_ties_and_degenerate_boxes():
    # 16 x 8 = 128 against a canonical area of 80: 128 / 4 = 32 and 128 are both 48 away;
    # the tie goes to the smaller scale (the first factor)
    box = torch.tensor([[0.0, 0.0, 16.0, 8.0]])
    assert assign_scales(box, [0.5, 1.0], canonical_area=80.0).tolist() == [0]
    # inverted and NaN boxes have area 0, equally far everywhere: the smallest scale, never an error
    bad = torch.tensor([[10.0, 10.0, 0.0, 0.0], [float("nan"), 0.0, 5.0, 5.0]])
    assert assign_scales(bad, [0.5, 1.0]).tolist() == [0, 0]
    assert assign_scales(torch.zeros((0, 4)), [0.5, 1.0]).shape == (0,)


def _level(factor, sx, sy, n=2):
    images = ImageList(torch.zeros(n, 3, 8, 8), [(8, 8)] * n)
    return PyramidLevel(factor, images, torch.tensor([[sx, sy]] * n), {"p": torch.full((1,), factor)})


def test_outputs_come_back_in_the_proposals_order_with_per_axis_factors():
    # A fake head: class output = the level's factor, "deltas" = the boxes it was given.
    calls = []

    def predict(images, features, boxes):
        calls.append([len(b) for b in boxes])
        flat = torch.cat(boxes)
        return features["p"].expand(len(flat), 1).clone(), flat

    levels = [_level(0.5, 0.5, 0.48), _level(1.0, 1.0, 1.0)]
    big, small = [0.0, 0.0, 600.0, 600.0], [0.0, 0.0, 100.0, 100.0]  # 360000 -> 0.5; 10000 -> 1.0
    boxes = [torch.tensor([small, big, small]), torch.tensor([big])]
    cls, deltas = pyramid_predict(predict, levels, boxes)
    assert cls.squeeze(1).tolist() == [1.0, 0.5, 1.0, 0.5]
    assert calls == [[1, 1], [2, 0]]  # level 0.5: one box of each image; level 1: image 0's two
    # pooled with the image's exact factors (sx, sy) = (0.5, 0.48)
    assert deltas[1].tolist() == pytest.approx([0.0, 0.0, 300.0, 288.0])
    assert deltas[0].tolist() == small and deltas[3].tolist() == pytest.approx([0.0, 0.0, 300.0, 288.0])
    # no proposals at all: the top level answers with empty outputs
    cls, deltas = pyramid_predict(predict, levels, [torch.zeros((0, 4)), torch.zeros((0, 4))])
    assert cls.shape == (0, 1) and deltas.shape == (0, 4)


TINY_MODEL = {
    "backbone": {"name": "tiny", "fpn": False, "tiny_widths": [8, 16, 16, 16]},
    "anchors": {"sizes": [[16, 32, 64]], "aspect_ratios": [[1.0]]},
    "proposals": {"rpn": {"pre_nms_topk_test": 60, "post_nms_topk_test": 30}},
    "roi_head": {"fc_dims": [16, 16], "score_thresh": 0.0, "pooler": "roi_pool"},
}


# SPP-net's own multi-scale testing (sec. 3.1.2): the spatial pyramid head on the same pyramid
SPP_MODEL = {
    **TINY_MODEL,
    "roi_head": {"name": "spp", "fc_dims": [16, 16], "score_thresh": 0.0, "spp_levels": [3, 2, 1]},
}


def _model(test_scales=(), spec=None):
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, spec or TINY_MODEL), 3, InputConfig(test_scales=list(test_scales)))
    return model.eval()


def _batch(sizes, input_cfg, seed=1):
    """Random images of the given (h, w) through the config's test transforms."""
    g = torch.Generator().manual_seed(seed)
    transforms = dataset_transforms(input_cfg, train=False)
    tensors, geometries = [], []
    for h, w in sizes:
        image = torch.rand(3, h, w, generator=g)
        empty = Target(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64), geometry=Geometry.identity(h, w))
        t, target = transforms(image, empty)
        tensors.append(t)
        geometries.append(target.geometry)
    return ImageList.from_tensors(tensors, 16, geometries=geometries, image_ids=list(range(len(sizes))))


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.boxes, y.boxes) and torch.equal(x.scores, y.scores) and torch.equal(x.labels, y.labels)


def test_one_scale_is_todays_single_scale_path_exactly():
    plain = InputConfig(min_size_test=96, max_size=160)
    one = InputConfig(min_size_test=50, max_size=160, test_scales=[96])  # replaces min_size_test
    batch = _batch([(80, 120), (100, 90)], plain)
    again = _batch([(80, 120), (100, 90)], one)
    assert torch.equal(batch.tensor, again.tensor)  # the pipeline resized to the one scale
    model, model_one = _model(), _model([96])
    assert model_one.test_factors == []
    with torch.no_grad():
        ref, _ = model(batch)
        out, _ = model_one(again)
    assert sum(len(d.boxes) for d in ref) > 0
    _same(ref, out)


def test_a_pyramid_whose_regions_stay_at_the_largest_scale_changes_nothing():
    # On ~100 px images every region is far below 224^2: the largest scale is the closest
    # for all of them, so the extra level is computed but never pooled from.
    cfg = InputConfig(min_size_test=96, max_size=160, test_scales=[48, 96])
    batch = _batch([(80, 120)], cfg)
    model, pyramid_model = _model(), _model([48, 96])
    assert pyramid_model.test_factors == [0.5, 1.0]
    with torch.no_grad():
        ref, _ = model(batch)
        out, _ = pyramid_model(batch)
    _same(ref, out)


@pytest.mark.parametrize("spec", [TINY_MODEL, SPP_MODEL], ids=["fast_rcnn", "spp"])
def test_a_large_region_is_predicted_from_the_smaller_scale(spec):
    model = _model([240, 480], spec)
    head = model.roi_head
    if spec is SPP_MODEL:  # SVMs and box regressors "fitted" (random): the scores and deltas SPP-net tests with
        g = torch.Generator().manual_seed(5)
        head.svms.set(torch.randn(head.svms.weight.shape, generator=g), torch.randn(3, generator=g), 0.5)
        w = head.box_regressor.weight
        head.box_regressor.set(0.01 * torch.randn(w.shape, generator=g), torch.zeros(3, 4), 0.5)
    images = ImageList(torch.randn(1, 3, 480, 480, generator=torch.Generator().manual_seed(3)), [(480, 480)])
    boxes = [torch.tensor([[0.0, 0.0, 448.0, 448.0], [100.0, 100.0, 200.0, 200.0]])]
    # 448^2 * 0.25 = 224^2 exactly -> level 0.5; 100^2 -> level 1
    assert assign_scales(boxes[0], model.test_factors).tolist() == [0, 1]
    with torch.no_grad():
        features = model.backbone(images.tensor)
        levels = build_pyramid(model.backbone, images, features, model.test_factors, 16)
        cls, deltas = pyramid_predict(head.predict, levels, boxes)
        # independently: the image resized to 240 px, the box halved, the head's own predict
        small = resize_image(images.tensor[0], 0.5)[None]
        assert small.shape[-2:] == (240, 240) and torch.equal(levels[0].images.tensor, small)
        cls0, deltas0 = head.predict(ImageList(small, [(240, 240)]), model.backbone(small), [boxes[0][:1] * 0.5])
        cls1, deltas1 = head.predict(images, features, [boxes[0][1:]])
    torch.testing.assert_close(cls, torch.cat([cls0, cls1]), rtol=0, atol=0)
    torch.testing.assert_close(deltas, torch.cat([deltas0, deltas1]), rtol=0, atol=0)
    assert not torch.equal(cls0, head.predict(images, features, [boxes[0][:1]])[0])  # the scale mattered


def test_part_times_add_up_per_image():
    model = _model([48, 96])
    batch = _batch([(80, 120), (100, 90)], InputConfig(min_size_test=96, max_size=160, test_scales=[48, 96]))
    model.part_times = PartTimes()
    with torch.no_grad():
        model(batch)
        model(batch)
    times = model.part_times
    assert times.images == 4
    assert times.features > 0 and times.proposals > 0 and times.head > 0
    per = times.per_image()
    assert per["total"] == pytest.approx(per["features"] + per["proposals"] + per["head"])
    assert per["features"] == pytest.approx(times.features / 4)
    # training mode never times (nor builds a pyramid)
    model.train()
    before = (times.features, times.images)
    empty = [Target(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64)) for _ in range(2)]
    _, losses = model(batch, empty)
    assert losses and (times.features, times.images) == before
