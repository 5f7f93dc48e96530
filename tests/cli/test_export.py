"""``detkit export`` end to end, and ``tools/onnx_infer.py`` (onnxruntime alone) on its file.

- a checkpoint (config and class names stored inside) exports to ONNX and TorchScript, the
  format taken from --format or the file name; overrides change the stored config;
- an existing file is kept without --overwrite, the checkpoint itself never replaced;
- a corrupt checkpoint, a model with Selective Search or proposal-file proposals: one line,
  exit status 2, nothing written;
- tools/onnx_infer.py, run with detkit and torch blocked from import, gives the detections of
  detkit's Predictor on a PNG (boxes in the image's own pixels).
"""

import ast
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from detkit.cli import main
from detkit.config import from_dict, to_dict
from detkit.engine.checkpoint import save_checkpoint
from detkit.engine.predictor import Predictor
from detkit.modeling.build import build_model
from detkit.schema import Config

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "onnx_infer.py"
CLASSES = ["circle", "square", "triangle"]


def tiny_config(proposals=None) -> Config:
    model = {
        "backbone": {"name": "tiny", "fpn": True, "out_channels": 16, "tiny_widths": [8, 16, 16, 16]},
        "anchors": {"sizes": [[16], [32], [64], [128], [256]]},
        "roi_head": {"name": "fast_rcnn", "fc_dims": [32, 32], "detections_per_img": 1000},
        "proposals": proposals or {"rpn": {"pre_nms_topk_test": 500, "post_nms_topk_test": 300}},
    }
    return from_dict(
        Config, {"data": {"classes": CLASSES, "input": {"min_size_test": 192, "max_size": 320}}, "model": model}
    )


def write_checkpoint(path, proposals=None):
    """A seeded random tiny Faster R-CNN with detections (see tests/engine/test_export.py for
    the biased logits and the box deltas), its config and class names stored inside."""
    cfg = tiny_config(proposals)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(CLASSES))
    if proposals is None:
        with torch.no_grad():
            model.roi_head.predictor.cls_score.bias[1] += 4.0
            model.roi_head.predictor.cls_score.bias[3] += 4.5
            torch.nn.init.normal_(model.proposal_generator.head.bbox_pred.weight, std=0.05)
            torch.nn.init.normal_(model.roi_head.predictor.bbox_pred.weight, std=0.05)
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "class_names": CLASSES})
    return path


def assert_same_detections(ref, boxes, scores, labels):
    """Same count; every reference detection has one of the same label within 1e-3 px and
    1e-4 in score (tied scores may come in either order)."""
    assert len(boxes) == len(ref)
    free = torch.ones(len(boxes), dtype=torch.bool)
    for box, score, label in zip(ref.boxes, ref.scores, ref.labels):
        dist = (boxes - box).abs().max(dim=1).values
        dist[(labels != label) | ~free] = float("inf")
        j = int(dist.argmin())
        assert dist[j] < 1e-3 and abs(float(scores[j]) - float(score)) < 1e-4, (box.tolist(), float(score))
        free[j] = False


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("export") / "model_final.pt")


@pytest.fixture(scope="module")
def onnx_export(checkpoint):
    """``detkit export --checkpoint CKPT --out det.onnx`` (format from the name) -> (file, stdout)."""
    out = checkpoint.parent / "det.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out, printed.getvalue()


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_export_writes_both_formats_and_keeps_what_exists(checkpoint, onnx_export, tmp_path, capsys):
    onnx_file, printed = onnx_export
    assert printed.startswith(f"wrote {onnx_file} (onnx, ") and "3 classes" in printed
    # the built-in check ran the file on a portrait image (the trace was landscape)
    checked = re.search(r"eager model on a 268x192 image \(traced at 192x256\): (\d+) vs (\d+) detections", printed)
    assert checked and checked[1] == checked[2] and int(checked[1]) > 10, printed
    ts_file = tmp_path / "det.ts"
    args = ["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(ts_file)]
    assert main(args + ["--no-check"]) == 0
    assert "checked" not in capsys.readouterr().out
    extra = {"detkit.json": ""}
    with pytest.warns(FutureWarning):  # torch 2.14 deprecates TorchScript; it still loads
        module = torch.jit.load(str(ts_file), _extra_files=extra)
    assert json.loads(extra["detkit.json"])["class_names"] == CLASSES
    boxes, scores, labels = module(torch.zeros(3, 150, 170))
    assert boxes.shape[1:] == (4,) and scores.shape == labels.shape == boxes.shape[:1]

    before = onnx_file.read_bytes()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(onnx_file)]) == 2
    assert error_line(capsys) == f"detkit: error: {onnx_file} exists; pass --overwrite to replace it"
    assert onnx_file.read_bytes() == before
    ckpt_bytes = checkpoint.read_bytes()
    onto_itself = ["--format", "onnx", "--out", str(checkpoint), "--overwrite"]
    assert main(["export", "--checkpoint", str(checkpoint), *onto_itself]) == 2
    assert "is the checkpoint itself" in error_line(capsys)
    assert checkpoint.read_bytes() == ckpt_bytes
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "det.bin")]) == 2
    assert "--format: say onnx or torchscript" in error_line(capsys)


def test_overrides_change_the_stored_config_and_overwrite_replaces(checkpoint, tmp_path):
    out = tmp_path / "strict.onnx"
    out.write_bytes(b"an older export")
    # the first key=value lands in argparse's optional CONFIG slot; it is still an override
    args = ["export", "model.roi_head.score_thresh=0.99", "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main(args + ["data.input.min_size_test=160", "--overwrite", "--no-check"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["detkit"])
    assert meta["score_thresh"] == 0.99 and meta["min_size"] == 160
    boxes, scores, labels = session.run(None, {"image": np.zeros((3, 160, 213), np.float32)})
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)  # nothing reaches 0.99


def test_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a torch file")
    out = tmp_path / "x.onnx"
    assert main(["export", "--checkpoint", str(bad), "--out", str(out)]) == 2
    assert error_line(capsys) == (
        f"detkit: error: {bad} is not a readable detkit checkpoint (corrupt, truncated, or not a torch file)"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "proposals, expected",
    [
        ({"method": "selective_search"}, "model.proposals.method: selective_search cannot be exported: "),
        (
            {"method": "precomputed", "precomputed": {"path": "props.npz"}},
            "model.proposals.method: precomputed cannot be exported: ",
        ),
    ],
)
def test_unsupported_proposal_sources_are_one_line(proposals, expected, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "ss.pt", proposals)
    out = tmp_path / "x.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    line = error_line(capsys)
    assert line.startswith("detkit: error: " + expected) and "only RPN models (Faster R-CNN) export" in line
    assert not out.exists() and not list(tmp_path.glob(".x.pt.*"))


# -- tools/onnx_infer.py ----------------------------------------------------------------------
BLOCKER = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("detkit", "torch", "torchvision"):
            raise ImportError("blocked in this test: " + name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_onnx_infer_source_imports_neither_detkit_nor_torch():
    tree = ast.parse(TOOL.read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert "onnxruntime" in names
    assert not [n for n in names if n.split(".")[0] in ("detkit", "torch", "torchvision")]


def test_onnx_infer_gives_the_predictors_detections(checkpoint, onnx_export, tmp_path):
    model_file, _ = onnx_export
    rng = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(
        torch.tensor(rng.random((1, 3, 15, 20)), dtype=torch.float32), size=(300, 410), mode="bilinear"
    )[0]
    array = (smooth.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # (300, 410, 3) RGB
    png = tmp_path / "blobs.png"
    Image.fromarray(array).save(png)
    result = tmp_path / "dets.json"
    # Isolated mode (-I: no PYTHONPATH, no user site), detkit / torch imports raising
    cmd = [sys.executable, "-I", "-c", BLOCKER, str(TOOL), str(model_file), str(png)]
    proc = subprocess.run(
        cmd + ["--score-thresh", "0", "--json", str(result), "--draw", str(tmp_path / "drawn")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{png}: ") and "(410x300 px, input 262x192," in proc.stdout  # s = 192/300
    assert (tmp_path / "drawn" / "blobs_detections.png").is_file()
    found = json.loads(result.read_text())[str(png)]

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    ref = predictor(array)  # detkit's own pipeline, boxes in the image's pixels
    assert len(ref) > 10
    assert [d["class"] for d in found] == [CLASSES[k - 1] for k in (d["label"] for d in found)]
    assert_same_detections(
        ref,
        torch.tensor([d["box"] for d in found]),
        torch.tensor([d["score"] for d in found]),
        torch.tensor([d["label"] for d in found]),
    )
