"""The contract of the Detector's parts (detkit.modeling.interfaces), checked for every
ProposalGenerator x every RoIHead of the builder tables, through ``Detector``, in train and
eval mode, on two generated shapes images whose originals are twice the network input:

- every built part implements its interface (Backbone, ProposalGenerator, RoIHead);
- proposals: (R, 4) float boxes inside the input image, (R,) scores, detached before the head;
- training: namespaced, finite, scalar losses (the RPN's loss_rpn_*; Selective Search and
  proposal files add none), gradients reach the head;
- eval: detections per image with labels in 1..K and sorted scores, in ORIGINAL pixels (all
  inside the original image, at least one beyond the input's size), and a validation loss
  with the same keys when targets are given.

A new generator or head must be added to GENERATORS / HEADS (a test compares them with the
builder tables)."""

import numpy as np
import pytest
import torch

from detkit.config import from_dict
from detkit.data.proposal_files import save_proposals
from detkit.data.shapes import render_shapes_image
from detkit.data.transforms import Normalize
from detkit.modeling.build import PROPOSAL_GENERATORS, ROI_HEADS, build_model
from detkit.modeling.interfaces import Backbone, ProposalGenerator, RoIHead
from detkit.schema import ModelConfig
from detkit.structures import Geometry, ImageList, Target

K = 3
ORIGINAL_SCALE = 2  # the originals are twice the network input on both axes

# The model each head is tested in (a tiny backbone): the Fast R-CNN head on FPN, the Res5
# head on the single C4 map it needs, R-CNN's head with the tiny network run on 32 px crops
# (the detector's backbone is then the image; an RPN looks at raw pixels), SPP-net's head on
# the C4 map.
HEADS = {
    "fast_rcnn": {
        "backbone": {"name": "tiny", "fpn": True, "out_channels": 16, "tiny_widths": [8, 16, 16, 16]},
        "anchors": {"sizes": [[16], [32], [64], [128], [256]]},
        "roi_head": {"name": "fast_rcnn", "fc_dims": [32, 32]},
    },
    "res5": {
        "backbone": {"name": "tiny", "fpn": False, "tiny_widths": [8, 16, 16, 24]},
        "anchors": {"sizes": [[16, 32, 64]]},
        "roi_head": {"name": "res5", "pooler_resolution": 14},
    },
    "rcnn": {
        "backbone": {"name": "tiny", "fpn": False, "tiny_widths": [8, 16, 16, 16]},
        "anchors": {"sizes": [[16, 32, 64]]},
        "roi_head": {"name": "rcnn", "warp_size": 32, "warp_context": 4, "pooler_resolution": 2, "fc_dims": [32, 32]},
    },
    "spp": {
        "backbone": {"name": "tiny", "fpn": False, "tiny_widths": [8, 16, 16, 16]},
        "anchors": {"sizes": [[16, 32, 64]]},
        "roi_head": {"name": "spp", "spp_levels": [2, 1], "fc_dims": [32, 32]},
    },
}
# The heads fine-tuned with a softmax loss only (their box regressors are fitted afterwards).
NO_BOX_LOSS = {"rcnn", "spp"}
GENERATORS = {
    "rpn": {"method": "rpn", "rpn": {"post_nms_topk_train": 200, "post_nms_topk_test": 100}},
    "selective_search": {"method": "selective_search", "selective_search": {"mode": "single", "min_size": 8}},
    "precomputed": {"method": "precomputed"},  # path filled in per test
}
TRAINABLE_PROPOSALS = {"rpn"}


def test_the_lists_cover_the_builder_tables():
    assert set(HEADS) == set(ROI_HEADS)
    assert set(GENERATORS) == set(PROPOSAL_GENERATORS)


@pytest.fixture(scope="module")
def shapes():
    return [render_shapes_image("test", i, seed=0) for i in range(2)]


def batch(shapes):
    """Two network inputs (the rendered images) with geometries saying the originals were
    twice as large, and targets in input pixels."""
    normalize = Normalize()
    tensors, geometries, targets, ids = [], [], [], []
    for s in shapes:
        t = torch.from_numpy(s.image).permute(2, 0, 1).float() / 255.0
        tensors.append(normalize(t, None)[0])
        h, w = s.height, s.width
        geometries.append(Geometry((h * ORIGINAL_SCALE, w * ORIGINAL_SCALE), (h, w)))
        boxes = torch.tensor([[b[0], b[1], b[2] + 1, b[3] + 1] for b in (o.box for o in s.objects)]).float()
        targets.append(Target(boxes, torch.tensor([o.label for o in s.objects]), image_id=s.image_id))
        ids.append(s.image_id)
    return tensors, geometries, targets, ids


def proposal_file(tmp_path, shapes):
    """Per image: its GT boxes jittered, a whole-image box and a few random boxes, in
    ORIGINAL pixels (as proposal files are)."""
    rng = np.random.default_rng(0)
    table = {}
    for s in shapes:
        h, w = s.height * ORIGINAL_SCALE, s.width * ORIGINAL_SCALE
        gt = np.array([[b[0], b[1], b[2] + 1, b[3] + 1] for b in (o.box for o in s.objects)], np.float32)
        gt = gt * ORIGINAL_SCALE + rng.uniform(-4, 4, gt.shape).astype(np.float32)
        xy = rng.uniform(0, [w * 0.7, h * 0.7], (20, 2))
        random = np.concatenate([xy, xy + rng.uniform(16, 80, (20, 2))], 1).astype(np.float32)
        boxes = np.concatenate([gt, [[0, 0, w, h]], random]).astype(np.float32)
        table[s.image_id] = (boxes, np.linspace(1, 0.1, len(boxes)).astype(np.float32))
    return save_proposals(tmp_path / "proposals.npz", table)


def build(head, generator, tmp_path, shapes):
    proposals = {**GENERATORS[generator]}
    if generator == "precomputed":
        proposals["precomputed"] = {"path": str(proposal_file(tmp_path, shapes))}
    cfg = from_dict(ModelConfig, {**HEADS[head], "proposals": proposals})
    cfg.roi_head.score_thresh = 0.0  # an untrained head: keep every detection to look at
    cfg.roi_head.batch_size_per_image = 32
    torch.manual_seed(0)
    return build_model(cfg, num_classes=K)


@pytest.mark.parametrize("generator", list(GENERATORS))
@pytest.mark.parametrize("head", list(HEADS))
def test_generator_and_head_through_the_detector(head, generator, tmp_path, shapes, one_thread):
    model = build(head, generator, tmp_path, shapes)
    assert isinstance(model.backbone, Backbone)
    assert isinstance(model.proposal_generator, ProposalGenerator)
    assert isinstance(model.roi_head, RoIHead) and model.roi_head.num_classes == K

    tensors, geometries, targets, ids = batch(shapes)
    images = ImageList.from_tensors(tensors, model.size_divisibility, geometries=geometries, image_ids=ids)
    assert images.tensor.shape[-1] % model.size_divisibility == 0

    seen = []
    head_forward = model.roi_head.forward

    def spy(images, features, proposals, targets=None):
        seen.append(proposals)
        return head_forward(images, features, proposals, targets)

    model.roi_head.forward = spy

    # -- training --------------------------------------------------------------------
    model.train()
    detections, losses = model(images, targets)
    expected = ({"loss_cls"} if head in NO_BOX_LOSS else {"loss_cls", "loss_box"}) | (
        {"loss_rpn_cls", "loss_rpn_box"} if generator in TRAINABLE_PROPOSALS else set()
    )
    assert detections == [] and set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["loss_cls"] > 0
    sum(losses.values()).backward()
    grad = model.roi_head.predictor.cls_score.weight.grad
    assert grad is not None and grad.abs().sum() > 0

    (proposals,) = seen
    assert len(proposals) == 2
    for p, (h, w) in zip(proposals, images.image_sizes):
        assert p.boxes.dtype == torch.float32 and p.boxes.dim() == 2 and p.boxes.shape[1] == 4
        assert p.scores.shape == (len(p),) and len(p) > 0
        assert not p.boxes.requires_grad and p.boxes.grad_fn is None  # detached before the head
        assert not p.scores.requires_grad
        # in network-input pixels: inside the (unpadded) input image
        assert (p.boxes[:, 0::2] >= 0).all() and (p.boxes[:, 2] <= w).all()
        assert (p.boxes[:, 1::2] >= 0).all() and (p.boxes[:, 3] <= h).all()

    # -- eval ------------------------------------------------------------------------
    model.eval()
    with torch.no_grad():
        check_eval(model, images, geometries, targets, expected)
        if head in NO_BOX_LOSS:
            # and with the SVMs and box regressors the offline stages fit (random ones here)
            h = model.roi_head
            h.svms.set(torch.randn(h.svms.weight.shape) * 0.1, torch.zeros(K), 1.0)
            h.box_regressor.set(torch.randn(h.box_regressor.weight.shape) * 1e-3, torch.zeros(K, 4), 1.0)
            check_eval(model, images, geometries, targets, expected)


def check_eval(model, images, geometries, targets, expected):
    detections, losses = model(images)
    assert losses == {} and len(detections) == 2
    beyond_input = False
    for det, geometry, (h, w) in zip(detections, geometries, images.image_sizes):
        n = len(det)
        assert n > 0 and det.boxes.shape == (n, 4) and det.scores.shape == (n,) and det.labels.shape == (n,)
        assert det.labels.dtype == torch.int64 and ((det.labels >= 1) & (det.labels <= K)).all()
        assert (det.scores[:-1] >= det.scores[1:]).all()
        oh, ow = geometry.orig_size
        assert (det.boxes >= 0).all() and (det.boxes[:, 2] <= ow).all() and (det.boxes[:, 3] <= oh).all()
        beyond_input |= bool((det.boxes[:, 2] > w).any() or (det.boxes[:, 3] > h).any())
    assert beyond_input, "detections are still in network-input pixels"
    # validation loss in eval mode: the same keys as in training
    detections, losses = model(images, targets)
    assert set(losses) == expected and len(detections) == 2
