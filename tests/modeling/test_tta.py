"""Test-time mirroring: the views, the merge (hand-computed and against a loop
re-implementation) and the detector's plumbing through its geometries."""

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from detkit.modeling.detector import Detector
from detkit.modeling.timing import PartTimes
from detkit.modeling.tta import MergeSettings, merge_views, mirrored_view
from detkit.structures import Detections, Geometry, ImageList, Proposals, Target


def dets(boxes, scores, labels):
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores), torch.tensor(labels)
    )


# ---------------------------------------------------------------- views


def test_mirrored_view_flips_only_the_valid_region_and_records_the_mirror():
    # one image of 2 x 3 valid pixels padded to 3 x 4 (padding -1)
    tensor = torch.full((1, 1, 3, 4), -1.0)
    tensor[0, 0, :2, :3] = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    images = ImageList(tensor, [(2, 3)], [Geometry((4, 6), (2, 3))])
    h = mirrored_view(images, "h")
    assert h.tensor[0, 0].tolist() == [[3, 2, 1, -1], [6, 5, 4, -1], [-1, -1, -1, -1]]
    v = mirrored_view(images, "v")
    assert v.tensor[0, 0].tolist() == [[4, 5, 6, -1], [1, 2, 3, -1], [-1, -1, -1, -1]]
    hv = mirrored_view(images, "hv")
    assert hv.tensor[0, 0].tolist() == [[6, 5, 4, -1], [3, 2, 1, -1], [-1, -1, -1, -1]]
    assert h.geometries == [Geometry((4, 6), (2, 3), True, False)]
    assert v.geometries == [Geometry((4, 6), (2, 3), False, True)]
    assert hv.geometries == [Geometry((4, 6), (2, 3), True, True)]
    assert tensor[0, 0, 0].tolist() == [1, 2, 3, -1]  # the input batch is untouched
    with pytest.raises(ValueError, match="flip: one of h, v, hv, got 'x'"):
        mirrored_view(images, "x")


def test_mirrored_view_without_geometries_starts_from_the_identity():
    images = ImageList(torch.arange(6.0).reshape(1, 1, 2, 3), [(2, 3)])
    assert mirrored_view(images, "h").geometries == [Geometry((2, 3), (2, 3), True, False)]


# ---------------------------------------------------------------- merge, by hand

VIEW_A = dets([[0, 0, 10, 10], [0, 5, 10, 15]], [0.9, 0.3], [1, 1])
VIEW_B = dets([[1, 0, 11, 10], [20, 20, 30, 30]], [0.6, 0.8], [1, 2])


def test_merge_by_hand():
    # A's [0,0,10,10] and B's [1,0,11,10]: IoU 90 / 110 = 0.82 -> NMS keeps A's box; voting
    # averages both by score: (0.9 * [0,0,10,10] + 0.6 * [1,0,11,10]) / 1.5 = [0.4, 0, 10.4, 10];
    # score: mean of the views' best (0.9, 0.6) = 0.75.
    # B's class-2 box: no other view has it -> score (0 + 0.8) / 2 = 0.4, box unchanged.
    # A's [0,5,10,15]: IoU 50 / 150 = 0.33 with A's first box (kept by NMS at 0.5), 45 / 155
    # = 0.29 with B's -> no votes, its view's own 0.3 and B's 0 -> 0.15.
    out = merge_views([VIEW_A, VIEW_B], nms_iou=0.5, vote_iou=0.7, score_iou=0.6)
    torch.testing.assert_close(out.boxes, torch.tensor([[0.4, 0, 10.4, 10], [20, 20, 30, 30], [0, 5, 10, 15]]))
    torch.testing.assert_close(out.scores, torch.tensor([0.75, 0.4, 0.15]))
    assert out.labels.tolist() == [1, 2, 1]


def test_merge_scores_take_each_views_best_match_not_their_sum():
    # score_iou 0.3: A's two boxes (IoU 0.33) now match each other. A's [0,0,10,10]: view A's
    # best max(0.9, 0.3) = 0.9, view B 0.6 -> 0.75. A's [0,5,10,15]: view A's best 0.9, view
    # B none (0.29) -> 0.45, now above the class-2 box's 0.4.
    out = merge_views([VIEW_A, VIEW_B], nms_iou=0.5, vote_iou=0.0, score_iou=0.3)
    torch.testing.assert_close(out.scores, torch.tensor([0.75, 0.45, 0.4]))
    assert out.labels.tolist() == [1, 1, 2]


def test_merge_steps_switch_off_at_zero_and_cap_the_count():
    out = merge_views([VIEW_A, VIEW_B], nms_iou=0.5, vote_iou=0.0, score_iou=0.0, max_detections=2)
    # plain NMS over the pooled boxes: the kept boxes as they are, with their own scores
    torch.testing.assert_close(out.boxes, torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]))
    torch.testing.assert_close(out.scores, torch.tensor([0.9, 0.8]))
    # a looser NMS keeps B's box too (IoU 0.82 <= 0.9)
    assert len(merge_views([VIEW_A, VIEW_B], nms_iou=0.9, vote_iou=0.0, score_iou=0.0)) == 4


def test_merge_of_one_view_returns_it_sorted():
    out = merge_views([VIEW_B])
    torch.testing.assert_close(out.boxes, VIEW_B.boxes.flip(0))  # 0.8 before 0.6
    torch.testing.assert_close(out.scores, torch.tensor([0.8, 0.6]))


def test_merge_of_empty_views():
    out = merge_views([Detections.empty(), Detections.empty()])
    assert out.boxes.shape == (0, 4) and out.labels.dtype == torch.int64
    with pytest.raises(ValueError, match="no views"):
        merge_views([])


# ---------------------------------------------------------------- merge, against a loop


def loop_merge(views, nms_iou, vote_iou, score_iou, max_detections):
    """Plain-Python merge: greedy per-class NMS, then the two averages, box by box."""
    pool = [(v, b, float(s), int(c)) for v, d in enumerate(views) for b, s, c in zip(d.boxes, d.scores, d.labels)]
    order = sorted(range(len(pool)), key=lambda i: -pool[i][2])
    kept = []
    for i in order:
        if all(pool[j][3] != pool[i][3] or box_iou(pool[i][1][None], pool[j][1][None]).item() <= nms_iou for j in kept):
            kept.append(i)
    out = []
    for i in kept:
        _, box, score, label = pool[i]
        same = [p for p in pool if p[3] == label]
        ious = [box_iou(box[None], p[1][None]).item() for p in same]
        votes = [(p[2], p[1]) for p, iou in zip(same, ious) if iou >= vote_iou]
        new_box = sum(s * b for s, b in votes) / sum(s for s, _ in votes)
        best = [
            max([p[2] for p, iou in zip(same, ious) if p[0] == v and iou >= score_iou], default=0.0)
            for v in range(len(views))
        ]
        out.append((sum(best) / len(views), new_box, label))
    out.sort(key=lambda t: -t[0])
    return out[:max_detections]


def test_merge_matches_a_loop_reimplementation_on_random_views():
    g = torch.Generator().manual_seed(0)
    views = []
    for n in (7, 5, 0, 9):
        xy = torch.rand(n, 2, generator=g) * 40
        wh = 5 + torch.rand(n, 2, generator=g) * 20
        views.append(
            Detections(torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g), torch.randint(1, 3, (n,), generator=g))
        )
    got = merge_views(views, nms_iou=0.5, vote_iou=0.6, score_iou=0.4, max_detections=10)
    want = loop_merge(views, 0.5, 0.6, 0.4, 10)
    assert len(got) == len(want) == 10
    torch.testing.assert_close(got.scores, torch.tensor([w[0] for w in want]))
    torch.testing.assert_close(got.boxes, torch.stack([w[1] for w in want]))
    assert got.labels.tolist() == [w[2] for w in want]


# ---------------------------------------------------------------- the detector


class Backbone(nn.Module):
    out_features = ["p"]
    out_channels = 3
    out_strides = {"p": 1}
    size_divisibility = 1

    def forward(self, x):
        return {"p": x}


class Proposals1(nn.Module):
    def forward(self, images, features, targets=None):
        return [Proposals(torch.zeros(1, 4), torch.ones(1)) for _ in images.image_sizes], {}


class BrightestPixel(nn.Module):
    """Detects the brightest pixel of channel 0 as a 1 x 1 box scored by its value (class 1)."""

    num_classes = 1

    def __init__(self):
        super().__init__()
        self.targets_seen = []

    def forward(self, images, features, proposals, targets=None):
        self.targets_seen.append(targets)
        out = []
        for i, (h, w) in enumerate(images.image_sizes):
            plane = features["p"][i, 0, :h, :w]
            k = int(plane.argmax())
            y, x = divmod(k, w)
            box = torch.tensor([[x, y, x + 1, y + 1]], dtype=torch.float32)
            out.append(Detections(box, plane.max()[None], torch.ones(1, dtype=torch.int64)))
        losses = {} if targets is None else {"loss_cls": torch.tensor(1.0)}
        return out, losses


class TopLeft(BrightestPixel):
    """Always detects the input's top-left 2 x 2 pixels, score 1: blind to the content, so
    each mirrored view lands on another corner of the original image."""

    def forward(self, images, features, proposals, targets=None):
        box = Detections(torch.tensor([[0.0, 0, 2, 2]]), torch.ones(1), torch.ones(1, dtype=torch.int64))
        return [box for _ in images.image_sizes], {}


def image_batch():
    # image 0: 4 x 6 resized from 8 x 12, its brightest pixel at (x 4, y 1); image 1: 3 x 3
    # resized from 3 x 3 (padded to 4 x 6), brightest at (x 0, y 2)
    tensor = torch.zeros(2, 3, 4, 6)
    tensor[0, 0, 1, 4] = 0.8
    tensor[1, 0, 2, 0] = 0.5
    tensor[1, 0, 3, 5] = 9.0  # in the padding: never seen
    return ImageList(tensor, [(4, 6), (3, 3)], [Geometry((8, 12), (4, 6)), Geometry((3, 3), (3, 3))])


def test_every_view_finds_the_same_original_box():
    plain = Detector(Backbone(), Proposals1(), BrightestPixel()).eval()
    flipped = Detector(Backbone(), Proposals1(), BrightestPixel(), test_flips=["h", "v", "hv"]).eval()
    want, _ = plain(image_batch())
    got, _ = flipped(image_batch())
    # image 0: input box [4, 1, 5, 2] x2 -> [8, 2, 10, 4]; every view agrees, so the votes
    # and the mean score (4 x 0.8 / 4) give it back unchanged
    torch.testing.assert_close(want[0].boxes, torch.tensor([[8.0, 2, 10, 4]]))
    for w, g in zip(want, got):
        torch.testing.assert_close(g.boxes, w.boxes)
        torch.testing.assert_close(g.scores, w.scores)
    assert len(flipped.roi_head.targets_seen) == 4  # one pass per view


def test_a_content_blind_head_lands_on_each_corner():
    model = Detector(Backbone(), Proposals1(), TopLeft(), test_flips=["h", "v", "hv"]).eval()
    got, _ = model(image_batch())
    # image 0 (4 x 6 input, x2 to 8 x 12): [0,0,2,2] -> plain [0,0,4,4]; h [8,0,12,4];
    # v [0,4,4,8]; hv [8,4,12,8]; no two overlap, so each keeps score 1 / 4
    corners = {tuple(b) for b in got[0].boxes.tolist()}
    assert corners == {(0.0, 0.0, 4.0, 4.0), (8.0, 0.0, 12.0, 4.0), (0.0, 4.0, 4.0, 8.0), (8.0, 4.0, 12.0, 8.0)}
    torch.testing.assert_close(got[0].scores, torch.full((4,), 0.25))
    # image 1 (3 x 3): h -> [1, 0, 3, 2], v -> [0, 1, 2, 3], hv -> [1, 1, 3, 3]: each overlaps
    # the plain box by 2 / 6 < 0.5, so NMS keeps all four
    assert len(got[1]) == 4


def test_losses_come_from_the_plain_view_and_training_ignores_the_flips():
    head = BrightestPixel()
    model = Detector(Backbone(), Proposals1(), head, test_flips=["h"]).eval()
    targets = [Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)) for _ in range(2)]
    _, losses = model(image_batch(), targets)
    assert set(losses) == {"loss_cls"}
    assert head.targets_seen[0] is not None and head.targets_seen[1] is None
    model.train()
    head.targets_seen.clear()
    model(image_batch(), targets)
    assert len(head.targets_seen) == 1


def test_part_times_count_the_images_once():
    model = Detector(Backbone(), Proposals1(), BrightestPixel(), test_flips=["h", "hv"]).eval()
    model.part_times = PartTimes()
    model(image_batch())
    assert model.part_times.images == 2


def test_unknown_flip_and_merge_settings():
    with pytest.raises(ValueError, match="test_flips: each one of h, v, hv, got 'd'"):
        Detector(Backbone(), Proposals1(), BrightestPixel(), test_flips=["h", "d"])
    settings = MergeSettings(0.6, 0.0, 0.0, 1)
    model = Detector(Backbone(), Proposals1(), TopLeft(), test_flips=["h"], test_merge=settings).eval()
    got, _ = model(image_batch())
    assert [len(d) for d in got] == [1, 1]  # max_detections 1


# ---------------------------------------------------------------- config


def test_config_builds_the_views_and_the_merge():
    from detkit.config import from_dict
    from detkit.modeling.build import build_model
    from detkit.schema import Config

    cfg = from_dict(
        Config,
        {
            "model": {"backbone": {"name": "tiny"}, "roi_head": {"detections_per_img": 7}},
            "data": {"input": {"test_flips": ["hv", "h"], "test_merge_vote_iou": 0.0}},
        },
    )
    model = build_model(cfg.model, 2, cfg.data.input)
    assert model.test_flips == ["hv", "h"]
    assert model.test_merge == MergeSettings(nms_iou=0.5, vote_iou=0.0, score_iou=0.6, max_detections=7)
    assert build_model(cfg.model, 2).test_flips == []


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"test_flips": ["h", "h"]}, r"^data.input: test_flips: distinct flips, got \['h', 'h'\]"),
        ({"test_merge_score_iou": 1.5}, r"^data.input: test_merge_score_iou: an IoU in \[0, 1\], got 1.5"),
        ({"test_flips": ["x"]}, r"data.input.test_flips.*'x'"),
    ],
)
def test_bad_test_flip_settings_are_config_errors_naming_the_key(entry, message):
    from detkit.config import from_dict
    from detkit.errors import ConfigError
    from detkit.schema import Config

    with pytest.raises(ConfigError, match=message):
        from_dict(Config, {"data": {"input": entry}})
