"""Five pipelines, one machine (issue 10): the shipped configs, and nothing but them plus
size overrides, build SS + R-CNN (SVMs), SS + SPP-net, SS + Fast R-CNN, RPN + Fast R-CNN
(Faster R-CNN) and RPN + SVM, and each runs ``detkit train`` -> ``detkit eval`` from the
command line on a tiny generated shapes set (16 training, 8 test images of ~100 px).

What can fail here and nowhere else: a shipped config that no longer builds the model its
name promises (checked by the modules the checkpoint rebuilds into), a pipeline whose offline
stages are not the ones its paper has, RPN proposal files from a trained Faster R-CNN that the
SVM head cannot read, and ``detkit eval`` of a final checkpoint disagreeing with the training
run's own evaluation. The networks are far too small and short-trained for mAP floors (those
live in tests/cli/test_classic.py and the benchmarks); detections must still land inside the
original test images.
"""

import json
from pathlib import Path

import pytest
import torch

from detkit.cli import main
from detkit.data.voc import load_voc
from detkit.engine.predictor import model_from_checkpoint
from detkit.modeling.heads.fast_rcnn import FastRCNNHead
from detkit.modeling.heads.rcnn_svm import RCNNHead, SPPHead
from detkit.modeling.proposals.precomputed import PrecomputedProposals
from detkit.modeling.proposals.rpn import RPN

ROOT = Path(__file__).resolve().parents[1]
SHAPES = "{num_train: 16, num_test: 8, seed: 5, image_size: [96, 112], object_size: [20, 40]}"
SIZE = ["data.input.min_size_train=[96]", "data.input.max_size=128", "data.input.min_size_test=96"]
TINY = ["model.backbone.tiny_widths=[8,16,16,16]", "model.roi_head.fc_dims=[32,32]", "data.batch_size=2"]
BUDGET = ["train.max_iter=6", "train.warmup_iters=2", "train.log_period=100", "train.device=cpu"]
SVM = ["model.roi_head.svm.max_passes=1", "model.roi_head.region_batch=64"]

# pipeline -> (shipped config, the proposal source and head it must build, offline stages)
PIPELINES = {
    "ss_rcnn": ("configs/rcnn/shapes.yaml", PrecomputedProposals, RCNNHead, True),
    "ss_spp": ("configs/spp/shapes.yaml", PrecomputedProposals, SPPHead, True),
    "ss_fast_rcnn": ("configs/fast_rcnn/quickstart_shapes.yaml", PrecomputedProposals, FastRCNNHead, False),
    "rpn_fast_rcnn": ("configs/faster_rcnn/quickstart_shapes.yaml", RPN, FastRCNNHead, False),
    "rpn_svm": ("configs/rcnn/rpn_svm_shapes.yaml", PrecomputedProposals, RCNNHead, True),
}
CLASSIC_STAGES = ["finetune", "cache_features", "fit_svms", "fit_box_regression", "evaluate"]


def data_overrides(root):
    out = []
    for split in ("train", "test"):
        out += [f"data.{split}.root={root}", f"data.{split}.shapes={SHAPES}"]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny set and its Selective Search files (fast mode, as the configs ask)."""
    tmp = tmp_path_factory.mktemp("five")
    root = tmp / "shapes"
    spec = tmp / "data.yaml"
    spec.write_text(
        f"data:\n  train: {{format: shapes, root: {root}, split: train, shapes: {SHAPES}}}\n"
        f"  test: {{format: shapes, root: {root}, split: test, shapes: {SHAPES}}}\n"
    )
    ss = {}
    for split in ("train", "test"):
        ss[split] = tmp / f"ss_{split}.npz"
        args = ["proposals", str(spec), "--split", split, "--mode", "fast", "--min-size", "8"]
        assert main(args + ["--max-proposals", "300", "--out", str(ss[split]), "--no-progress"]) == 0
    return tmp, root, ss


def train_and_eval(name, tmp, root, files):
    config, *_ = PIPELINES[name]
    overrides = data_overrides(root) + SIZE + TINY + BUDGET
    if PIPELINES[name][3]:
        overrides += SVM
    if files is not None:
        overrides.append(f"model.proposals.precomputed.path=[{files['train']},{files['test']}]")
    run = tmp / name
    threads = torch.get_num_threads()
    try:
        assert main(["train", str(ROOT / config), "--out", str(run), "--no-progress", *overrides]) == 0
        out = tmp / f"{name}_eval"
        args = ["eval", str(ROOT / config), "--checkpoint", str(run / "model_final.pt"), "--out", str(out)]
        assert main(args + ["--no-progress", *overrides]) == 0
    finally:
        torch.set_num_threads(threads)
    return run, out


@pytest.fixture(scope="module")
def runs(data):
    tmp, root, ss = data
    out = {}
    for name in ("ss_rcnn", "ss_spp", "ss_fast_rcnn", "rpn_fast_rcnn"):
        out[name] = train_and_eval(name, tmp, root, None if name.startswith("rpn") else ss)
    # RPN + SVM: the Faster R-CNN just trained dumps its RPN proposals for both splits
    faster = PIPELINES["rpn_fast_rcnn"][0]
    rpn = {}
    for split in ("train", "test"):
        rpn[split] = tmp / f"rpn_{split}.npz"
        args = ["proposals", str(ROOT / faster), "--split", split, "--method", "rpn", "--max-proposals", "100"]
        args += ["--checkpoint", str(out["rpn_fast_rcnn"][0] / "model_final.pt"), "--device", "cpu"]
        assert main(args + ["--out", str(rpn[split]), "--no-progress", *data_overrides(root), *SIZE, *TINY]) == 0
    out["rpn_svm"] = train_and_eval("rpn_svm", tmp, root, rpn)
    return out


@pytest.mark.parametrize("name", list(PIPELINES))
def test_each_pipeline_builds_from_its_config_trains_and_evaluates(name, runs):
    _, proposal_type, head_type, classic = PIPELINES[name]
    run, evaluated = runs[name]
    model, cfg, classes = model_from_checkpoint(run / "model_final.pt", None, torch.device("cpu"))
    assert type(model.proposal_generator) is proposal_type and type(model.roi_head) is head_type
    assert classes == ["circle", "square", "triangle"]
    state = json.loads((run / "run_state.json").read_text())
    assert state["finished"] == (CLASSIC_STAGES if classic else ["train", "evaluate"])
    if classic:  # the SVMs and box regressors travel in the checkpoint
        sd = torch.load(run / "model_final.pt", weights_only=True)["model"]
        assert bool(sd["roi_head.svms.fitted"]) and bool(sd["roi_head.box_regressor.fitted"])
    trained = json.loads((run / "eval.json").read_text())
    again = json.loads((evaluated / "eval.json").read_text())
    assert 0.0 <= trained["mAP"] <= 1.0
    assert again["mAP"] == pytest.approx(trained["mAP"], abs=1e-9)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_detections_land_in_original_pixels(name, runs, data):
    """Images are resized to 96 px on the shorter side for the network; detections come
    back in each test image's own (96-112 px) coordinates (detection files: x, y, w, h with
    the dataset's native offset: x = x1 + 1, w = x2 - x1 - 1 for VOC)."""
    run, _ = runs[name]
    _, root, _ = data
    dataset = load_voc(root, "test", classes=["circle", "square", "triangle"])
    sizes = {str(r.image_id): (r.width, r.height) for r in dataset.records}
    dets = json.loads((run / "detections.json").read_text())
    assert dets, f"{name}: no detections at all"
    off = dataset.native_offset
    for d in dets:
        w, h = sizes[str(d["image_id"])]
        x, y, bw, bh = d["bbox"]
        x1, y1, x2, y2 = x - off, y - off, x + bw, y + bh  # back to detkit's xyxy
        assert -1e-3 <= x1 <= x2 <= w + 1e-3 and -1e-3 <= y1 <= y2 <= h + 1e-3, (d, w, h)
