"""Exporting a trained detector to TorchScript or ONNX (``detkit export``).

The exported graph takes ONE image and returns its detections:

    image   float32 (3, H, W), any H and W: RGB, scaled to [0, 1], normalised per channel
            ((x - pixel_mean) / pixel_std), then resized so that the shorter side is
            ``min_size`` unless the longer side would exceed ``max_size`` (bilinear,
            align_corners=False, sides floor(h * s) x floor(w * s)) -- what detkit's test
            pipeline does (``detkit.data.transforms``);
    boxes   float32 (R, 4) xyxy in the pixels of THAT input (the resized image): divide by
            the resize factor of each axis (resized / original side) for original pixels;
    scores  float32 (R,), best first;
    labels  int64 (R,) in 1..K, ``class_names[label - 1]``.

Resize and normalisation stay outside the graph, as they stay outside the model in detkit
(visible transforms in the data pipeline); the file stores what a caller needs for them as
metadata (``export_metadata``: sizes, mean/std, class names, the box convention): ONNX in
``metadata_props`` under the key ``detkit`` (JSON), TorchScript in the extra file
``detkit.json`` (``torch.jit.load(path, _extra_files={"detkit.json": ""})``).
``tools/onnx_infer.py`` runs an ONNX file with onnxruntime alone. Padding the image to the
backbone's size divisibility happens inside the graph.

How: ``ExportableDetector`` (image in, three tensors out) around a copy of the eval-mode
Detector is traced with ``torch.jit.trace`` on one example image. While tracing, the
inference path keeps every size that depends on the input a traced tensor (anchor grids,
per-level top-k counts, clipping to the image, RoIs of every FPN level), so the graph is
right for every input size, not only the example's. The TorchScript file is that trace; the
ONNX file comes from ``torch.onnx.export``'s TorchScript-based exporter (``dynamo=False``,
opset 17), for which torchvision registers ``nms``, ``roi_align`` and ``roi_pool``. The
torch.export-based exporter (``dynamo=True``) does not export these models on torch 2.14:
torch.export stops at the data-dependent branch on the box count in torchvision's
``batched_nms`` (a data-dependent guard on ``4 * u0 > 4000``). Loading the TorchScript file
needs ``import torchvision`` first (it registers those operators).

The copy pools RoIs with torchvision's ``roi_align`` kernel instead of the CPU sparse
RoIAlign (``poolers.sparse_roi_align``, an autograd Function with sparse matrices that
neither format can hold); the two agree up to float rounding.

Exportable: RPN proposals (Faster R-CNN) with the ``fast_rcnn`` (FPN or single map, RoIAlign
or RoIPool, also SVD-compressed) or ``res5`` head. Refused in one line (``ExportError``):
proposal sources that are not tensor operators (Selective Search, proposal files), the
R-CNN / SPP-net heads, multi-scale testing and test-time mirroring (see ``check_exportable``).

After writing, ``export_model`` runs the file on a second image of another shape and
compares it with the eager model (``ExportReport``); a difference is logged as a warning.

Shapes: R detections of the image, K foreground classes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import detkit
from detkit.errors import ExportError
from detkit.modeling.detector import Detector
from detkit.modeling.heads.fast_rcnn import FastRCNNHead
from detkit.modeling.heads.res5 import Res5Head
from detkit.modeling.poolers import RoIPooler
from detkit.modeling.proposals.precomputed import PrecomputedProposals
from detkit.modeling.proposals.rpn import RPN
from detkit.modeling.proposals.selective_search import SelectiveSearchProposals
from detkit.schema import Config
from detkit.structures import ImageList

logger = logging.getLogger("detkit")

FORMATS = ("onnx", "torchscript")
# 16 is the first opset whose RoiAlign has the half-pixel switch torchvision's aligned=True
# needs; 17 is the newest torchvision's operators are registered up to without warnings.
ONNX_OPSET = 17
METADATA_KEY = "detkit"  # ONNX metadata_props key; TorchScript: the extra file detkit.json
TORCHSCRIPT_EXTRA = "detkit.json"
EXPORT_FORMAT = "detkit-export-1"
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]

# Parity between the exported file and the eager model that the check after export expects:
# 1e-3 px (the test suite's bound, on a tiny model at <= 300 px), or 1e-5 of the image's
# longer side when that is more. ONNX Runtime's convolutions round differently from
# PyTorch's: through ResNet-50-FPN the features differ by ~2e-6 relative (measured), which
# moves boxes of an 800 x 1066 input by up to ~6e-3 px; TorchScript runs PyTorch's kernels.
BOX_TOL = 1e-3  # px
BOX_TOL_REL = 1e-5  # of the longer image side
SCORE_TOL = 1e-4

# Why a part cannot be exported, by what the config calls it.
_PROPOSAL_REASONS = {
    "selective_search": (
        "Selective Search segments and groups the image in NumPy/numba code (Felzenszwalb "
        "segmentation, greedy hierarchical grouping), not in torch operators a TorchScript or ONNX "
        "graph can hold; only RPN models (Faster R-CNN) export"
    ),
    "precomputed": (
        "its proposals are looked up by image id in proposal files on disk, which a TorchScript or "
        "ONNX graph cannot read; only RPN models (Faster R-CNN) export"
    ),
}
_HEAD_REASONS = {
    "RCNNHead": (
        "R-CNN's head runs the CNN on warped crops in pieces of region_batch regions and keeps each "
        "class's top-k per image in Python loops whose trip counts depend on the number of proposals "
        "(a trace would freeze them to the example image), and it is used with Selective Search proposals"
    ),
    "SPPHead": (
        "SPP-net's head pools in pieces of region_batch regions and keeps each class's top-k per image "
        "in Python loops whose trip counts depend on the number of proposals (a trace would freeze them "
        "to the example image), and it is used with Selective Search proposals"
    ),
}
_HEAD_NAMES = {"RCNNHead": "rcnn", "SPPHead": "spp", "FastRCNNHead": "fast_rcnn", "Res5Head": "res5"}


def check_exportable(model: nn.Module) -> None:
    """ExportError (one line naming the part and why) unless ``model`` is a Detector whose
    parts trace into a graph that is right for every input size: RPN proposals with the
    fast_rcnn or res5 head, single-scale testing."""
    if not isinstance(model, Detector):
        raise ExportError(f"only a detkit Detector can be exported, got {type(model).__name__}")
    generator = model.proposal_generator
    if isinstance(generator, SelectiveSearchProposals):
        raise ExportError(
            f"model.proposals.method: selective_search cannot be exported: {_PROPOSAL_REASONS['selective_search']}"
        )
    if isinstance(generator, PrecomputedProposals):
        raise ExportError(f"model.proposals.method: precomputed cannot be exported: {_PROPOSAL_REASONS['precomputed']}")
    if not isinstance(generator, RPN):
        raise ExportError(
            f"the proposal generator {type(generator).__name__} cannot be exported: only the RPN's "
            "inference path is written to trace"
        )
    head = model.roi_head
    if not isinstance(head, (FastRCNNHead, Res5Head)):
        kind = type(head).__name__
        name = _HEAD_NAMES.get(kind, kind)
        reason = _HEAD_REASONS.get(
            kind, "only the fast_rcnn and res5 heads' inference paths are written to trace and checked against eager"
        )
        raise ExportError(f"model.roi_head.name: {name} cannot be exported: {reason}")
    if getattr(model, "test_factors", None):
        # Multi-scale testing rescales the input to sizes computed in Python per image; a trace
        # would freeze them to the example image's.
        raise ExportError(
            "data.input.test_scales: multi-scale testing cannot be exported (a trace would freeze the pyramid's "
            "sizes to the example image); export with data.input.test_scales=[] for the single-scale graph"
        )
    if getattr(model, "test_flips", None):
        raise ExportError(
            "data.input.test_flips: test-time mirroring cannot be exported (the views' merge is not in the traced "
            "graph); export with data.input.test_flips=[] and mirror outside the model"
        )


class ExportableDetector(nn.Module):
    """One normalised, resized image (3, H, W) -> boxes (R, 4) in its pixels, scores (R,),
    labels (R,) in 1..K: the eval-mode Detector with the batch padding inside, the form that
    is traced. ``model`` is copied (and its RoI poolers set to torchvision's kernel, see the
    module docstring); the original is left as it was."""

    def __init__(self, model: Detector):
        super().__init__()
        check_exportable(model)
        model = copy.deepcopy(model).cpu().float().eval()
        for module in model.modules():
            if isinstance(module, RoIPooler):
                module.cpu_sparse = False
        self.model = model
        self.size_divisibility = int(model.size_divisibility)

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        # While tracing these sizes are 0-dim tensors, so the padding follows the input.
        h, w = image.shape[-2], image.shape[-1]
        d = max(self.size_divisibility, 1)
        # Zero padding at the bottom/right, as ImageList.from_tensors pads a batch.
        x = F.pad(image, (0, (d - w % d) % d, 0, (d - h % d) % d))[None]
        detections, _ = self.model(ImageList(x, [(h, w)]))
        det = detections[0]
        return det.boxes, det.scores, det.labels


# -- metadata and example inputs ---------------------------------------------------------------
def export_metadata(cfg: Config, class_names: List[str], fmt: str, source: str = "") -> Dict:
    """What a caller of the exported graph needs (see the module docstring), JSON-ready."""
    inp = cfg.data.input
    h = cfg.model.roi_head
    return {
        "format": EXPORT_FORMAT,
        "export_format": fmt,
        "input": "image float32 (3, H, W): RGB / 255, normalised with pixel_mean / pixel_std, then resized",
        "resize": (
            "scale s = min(min_size / min(h, w), max_size / max(h, w)); size floor(h * s) x floor(w * s); "
            "bilinear, align_corners=False, no antialiasing; normalise first, then resize"
        ),
        "min_size": int(inp.min_size_test),
        "max_size": int(inp.max_size),
        "pixel_mean": [float(v) for v in inp.pixel_mean],
        "pixel_std": [float(v) for v in inp.pixel_std],
        "size_divisibility_padded_inside": True,
        "boxes": "float32 (R, 4) xyxy in the pixels of the input image (the resized one)",
        "scores": "float32 (R,) best first",
        "labels": "int64 (R,) in 1..K: class_names[label - 1]",
        "class_names": list(class_names),
        "score_thresh": float(h.score_thresh),
        "nms_thresh": float(h.nms_thresh),
        "detections_per_img": int(h.detections_per_img),
        "model": f"{cfg.model.backbone.name}{' FPN' if cfg.model.backbone.fpn else ' C4'}, "
        f"{cfg.model.proposals.method}, {h.name} head",
        "source": source,
        "detkit_version": detkit.__version__,
        "torch_version": torch.__version__,
    }


def resized_size(min_size: int, max_size: int, height: int, width: int) -> Tuple[int, int]:
    """(h, w) of a ``height`` x ``width`` image after detkit's test resize (the arithmetic of
    ``data.transforms.resize_scale`` and ``F.interpolate``'s output size)."""
    s = min(min_size / min(height, width), max_size / max(height, width))
    return max(int(math.floor(height * s)), 1), max(int(math.floor(width * s)), 1)


def example_image(height: int, width: int, seed: int = 0) -> Tensor:
    """A normalised-looking (3, H, W) image: smooth random blobs (seeded) rather than white
    noise, so that features, proposals and detections vary with place."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, max(height // 24, 2), max(width // 24, 2), generator=g)
    img = F.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)[0]
    return (img - 0.45) / 0.25


# -- writing ------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What ``export_model`` wrote and how the file compared with the eager model on the check
    image (``checked`` False: the runtime to run it is not installed)."""

    path: Path
    fmt: str
    traced_size: Tuple[int, int]
    check_size: Tuple[int, int]
    checked: bool = False
    num_eager: int = 0
    num_exported: int = 0
    max_box_diff: float = float("nan")
    max_score_diff: float = float("nan")

    @property
    def box_tolerance(self) -> float:
        return max(BOX_TOL, BOX_TOL_REL * max(self.check_size))

    @property
    def agrees(self) -> bool:
        return (
            self.checked
            and self.num_eager == self.num_exported
            and self.max_box_diff <= self.box_tolerance
            and self.max_score_diff <= SCORE_TOL
        )

    def summary(self) -> str:
        h, w = self.check_size
        if not self.checked:
            return f"not run: onnxruntime is not installed (pip install onnxruntime) to check it on a {h}x{w} image"
        return (
            f"checked against the eager model on a {h}x{w} image (traced at {self.traced_size[0]}x"
            f"{self.traced_size[1]}): {self.num_exported} vs {self.num_eager} detections, max box difference "
            f"{self.max_box_diff:.2g} px, max score difference {self.max_score_diff:.2g}"
        )


@contextlib.contextmanager
def _quiet_export_warnings():
    """Silences the tracer's and exporter's warnings about Python values frozen into the trace
    (the static ones: class counts, the head's layout), the deprecation notices of the
    TorchScript tools, and torchvision's; the numerical check after export is what guards the
    graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def trace_model(model: Detector, example: Tensor) -> torch.jit.ScriptModule:
    """The TorchScript trace of ``ExportableDetector(model)`` on ``example`` (3, H, W)."""
    wrapper = ExportableDetector(model)
    with _quiet_export_warnings(), torch.no_grad():
        return torch.jit.trace(wrapper, (example,), check_trace=False)


def _write_onnx(model: Detector, example: Tensor, path: Path, metadata: Dict) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("--format onnx needs the onnx package (pip install onnx)") from None
    wrapper = ExportableDetector(model)
    with _quiet_export_warnings(), torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                "boxes": {0: "detections"},
                "scores": {0: "detections"},
                "labels": {0: "detections"},
            },
        )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    proto.doc_string = "detkit detector: " + metadata["input"] + "; " + metadata["boxes"]
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _write_torchscript(model: Detector, example: Tensor, path: Path, metadata: Dict) -> None:
    traced = trace_model(model, example)
    with _quiet_export_warnings():
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(metadata)})


def load_exported(path, fmt: Optional[str] = None) -> Tuple[Optional[Callable], Dict]:
    """-> (run, metadata): ``run(image (3, H, W) tensor) -> (boxes, scores, labels)`` tensors,
    or None for an ONNX file when onnxruntime is not installed."""
    path = Path(path)
    fmt = fmt or ("onnx" if path.suffix.lower() == ".onnx" else "torchscript")
    if fmt == "torchscript":
        import torchvision  # noqa: F401  (registers torchvision::nms / roi_align for the loaded graph)

        extra = {TORCHSCRIPT_EXTRA: ""}
        with _quiet_export_warnings():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = json.loads(extra[TORCHSCRIPT_EXTRA] or "{}")

        def run_ts(image: Tensor):
            with torch.no_grad():
                return module(image)

        return run_ts, meta
    try:
        import onnxruntime as ort
    except ImportError:
        return None, {}
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about unused initialisers
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))

    def run_onnx(image: Tensor):
        boxes, scores, labels = session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: image.detach().cpu().float().numpy()})
        return torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)

    return run_onnx, meta


def match_detections(
    ref_boxes: Tensor, ref_scores: Tensor, ref_labels: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor
) -> Tuple[float, float]:
    """Pairs every reference detection with the unused detection of the same label and the
    nearest box (equal scores may come in either order) -> (max box difference in px, max
    score difference); inf when a reference detection finds no partner."""
    used = torch.zeros(len(boxes), dtype=torch.bool)
    worst_box, worst_score = 0.0, 0.0
    for box, score, label in zip(ref_boxes, ref_scores, ref_labels):
        d = (boxes - box).abs().amax(dim=1) if len(boxes) else boxes.new_zeros((0,))
        d = torch.where((labels == label) & ~used, d, torch.full_like(d, float("inf")))
        if not len(d) or not torch.isfinite(d.min()):
            return float("inf"), float("inf")
        j = int(d.argmin())
        used[j] = True
        worst_box = max(worst_box, float(d[j]))
        worst_score = max(worst_score, abs(float(scores[j]) - float(score)))
    return worst_box, worst_score


def _atomic_target(out: Path) -> Path:
    """A temporary file beside ``out`` (renamed onto it when complete), with the permissions
    a plainly created file would get (mkstemp's are owner-only)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def export_model(
    model: Detector,
    cfg: Config,
    class_names: List[str],
    out,
    fmt: str,
    source: str = "",
    check: bool = True,
) -> ExportReport:
    """Write ``model`` (with ``cfg``'s input settings as metadata) to ``out`` as ``fmt``
    ("onnx" or "torchscript"); the caller decides about an existing ``out`` (the file is
    written to a temporary name and renamed, so a failed export leaves ``out`` as it was).
    Traced on a landscape image of the test size, checked on a portrait one."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (use {' or '.join(FORMATS)})")
    check_exportable(model)
    out = Path(out)
    inp = cfg.data.input
    traced_size = resized_size(inp.min_size_test, inp.max_size, 480, 640)  # landscape 4:3
    check_size = resized_size(inp.min_size_test, inp.max_size, 700, 500)  # portrait 5:7
    metadata = export_metadata(cfg, class_names, fmt, source)
    example = example_image(*traced_size, seed=0)
    report = ExportReport(out, fmt, traced_size, check_size)
    tmp = _atomic_target(out)
    try:
        if fmt == "onnx":
            _write_onnx(model, example, tmp, metadata)
        else:
            _write_torchscript(model, example, tmp, metadata)
        if check:  # before the rename: a graph that fails never replaces anything
            _check(model, tmp, report)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    if report.checked and not report.agrees:
        logger.warning(
            "the exported %s differs from the eager model by more than %.2g px / %.2g in score: %s",
            report.fmt,
            report.box_tolerance,
            SCORE_TOL,
            report.summary(),
        )
    return report


def _check(model: Detector, path: Path, report: ExportReport) -> None:
    """Runs the written file on an image of another shape than the traced one and compares
    it with the eager model (fills ``report``); ExportError when the file does not run."""
    run, _ = load_exported(path, report.fmt)
    if run is None:
        return
    image = example_image(*report.check_size, seed=1)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        (ref,), _ = model(ImageList.from_tensors([image], model.size_divisibility))
    model.train(was_training)
    try:
        boxes, scores, labels = run(image)
    except Exception as exc:  # the runtime's own error types (onnxruntime, TorchScript)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        h, w = report.check_size
        raise ExportError(
            f"the exported {report.fmt} graph fails on a {h}x{w} image (traced at {report.traced_size[0]}x"
            f"{report.traced_size[1]}), nothing written: {first}"
        ) from None
    ref = ref.to("cpu")
    report.checked = True
    report.num_eager, report.num_exported = len(ref), len(boxes)
    report.max_box_diff, report.max_score_diff = match_detections(
        ref.boxes, ref.scores, ref.labels, boxes, scores, labels
    )
