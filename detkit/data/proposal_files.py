"""Proposal files: reading, writing and converting them (the data side of precomputed
proposals).

R-CNN, SPP-net and Fast R-CNN never ran Selective Search inside the detector: proposals
were computed once per dataset (seconds per image) and read from disk at every epoch and at
test time. ``detkit proposals`` writes such files (Selective Search or a trained RPN, see
``detkit.engine.proposals``); ``detkit.modeling.proposals.precomputed.PrecomputedProposals``
plugs them into the Detector.

Shapes: N images in a file (or a batch), R proposals of one image, M = sum of R over a file.

File formats (never pickles):

    .npz   image_ids (N,) str; boxes (M, 4) float32; scores (M,) float32;
           counts (N,) int64, image i owns the next counts[i] rows of boxes/scores;
           meta: a 0-d str array holding a JSON object (method, mode, version, dataset, ...)
    .json  {"<image_id>": {"boxes": [[x1, y1, x2, y2], ...], "scores": [...]}, ...,
            "__meta__": {...}}   ("scores" may be left out: file order is then the rank)
    .mat   read only (``convert_mat`` / ``export_mat`` convert): the classic Selective
           Search release used by R-CNN and Fast R-CNN: cell arrays ``boxes`` (one (R, 4)
           [y1 x1 y2 x2] 1-based inclusive array per image) and ``images`` (the ids)

Boxes in every detkit file are xyxy in continuous pixels of the ORIGINAL image (detkit's
convention, ``detkit.structures``): files do not depend on the network input size, and
files from different methods are comparable. Image ids are stored as strings, so they come
back as ``str`` (an int COCO id 42 is looked up as "42"). Within an image, rows are sorted by
score, high first.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from detkit.errors import ProposalFileError
from detkit.structures import Proposals

logger = logging.getLogger("detkit")

__all__ = [
    "ProposalFileError",
    "PROPOSAL_FILE_VERSION",
    "save_proposals",
    "load_proposals",
    "read_mat",
    "convert_mat",
    "export_mat",
    "convert_json",
    "rank_scores",
    "ProposalTable",
]

PROPOSAL_FILE_VERSION = 1
META_KEY = "__meta__"  # the reserved key of the json format
SUFFIXES = (".npz", ".json")

# image id -> (boxes (R, 4) float32, scores (R,) float32)
ProposalTable = Dict[str, Tuple[np.ndarray, np.ndarray]]


def rank_scores(num: int) -> np.ndarray:
    """Scores for boxes known only by their order (file order = rank): 1 / (1 + rank),
    high = better, as ``selective_search`` scores its ranked boxes."""
    return (1.0 / (1.0 + np.arange(num, dtype=np.float64))).astype(np.float32)


# -- validation ---------------------------------------------------------------------------
def _check_image(path, image_id: str, boxes, scores) -> Tuple[np.ndarray, np.ndarray]:
    """-> (boxes (R, 4) float32, scores (R,) float32) or ProposalFileError."""
    where = f"proposal file {path}: image {image_id!r}"
    try:
        boxes = np.asarray(boxes, dtype=np.float64)
        scores = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProposalFileError(f"{where}: boxes and scores must be numbers") from None
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ProposalFileError(f"{where}: boxes must have shape (R, 4), got {boxes.shape}")
    if scores.ndim != 1 or len(scores) != len(boxes):
        raise ProposalFileError(f"{where}: {len(boxes)} boxes but scores of shape {scores.shape}")
    if not np.isfinite(boxes).all():
        raise ProposalFileError(f"{where}: boxes hold non-finite values")
    if np.isnan(scores).any():
        raise ProposalFileError(f"{where}: scores hold NaN")
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        raise ProposalFileError(
            f"{where}: {int(inverted.sum())} boxes have x2 < x1 or y2 < y1 (expected xyxy; "
            "a yxyx or xywh file must be converted first)"
        )
    return boxes.astype(np.float32), scores.astype(np.float32)


def _as_table(path, proposals: Mapping) -> ProposalTable:
    table: ProposalTable = {}
    for image_id, value in proposals.items():
        key = str(image_id)
        if key == META_KEY:
            raise ProposalFileError(f"proposal file {path}: {META_KEY!r} is reserved and cannot be an image id")
        if key in table:
            raise ProposalFileError(f"proposal file {path}: image id {key!r} appears twice")
        if isinstance(value, Proposals):
            value = (value.boxes.detach().cpu().numpy(), value.scores.detach().cpu().numpy())
        elif isinstance(value, Mapping):
            value = (value["boxes"], value["scores"])
        boxes, scores = value
        if isinstance(boxes, torch.Tensor):
            boxes = boxes.detach().cpu().numpy()
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu().numpy()
        table[key] = _check_image(path, key, boxes, scores)
    return table


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES + (".mat",):
        raise ProposalFileError(f"proposal file {path}: unknown type {suffix or '(none)'!r}; use .npz or .json")
    return suffix


# -- writing ------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """write(file object) into a temporary file beside ``path``, then rename: an interrupted
    write never leaves a truncated file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        # mkstemp makes the file private (0600); give it the permissions open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_proposals(path, proposals: Mapping, meta: Optional[dict] = None) -> Path:
    """Write ``proposals`` {image_id: (boxes (R, 4), scores (R,))} (also tensors,
    ``Proposals`` or {"boxes", "scores"} dicts) to ``path`` (.npz or .json, by suffix),
    atomically. Boxes must be xyxy in original-image pixels; image order is kept.
    ``meta``: JSON-serialisable facts about the file; "version" is added."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".mat":
        raise ProposalFileError(f"proposal file {path}: use export_mat to write .mat files")
    table = _as_table(path, proposals)
    meta = {**(meta or {}), "version": PROPOSAL_FILE_VERSION}
    try:
        meta_text = json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise ProposalFileError(f"proposal file {path}: meta is not JSON-serialisable ({exc})") from None
    if suffix == ".npz":
        ids = list(table)
        rows = [table[i] for i in ids]
        # unicode arrays (not object arrays), so np.load works with allow_pickle=False
        image_ids = np.array(ids, dtype=str) if ids else np.zeros((0,), "<U1")
        boxes = np.concatenate([b for b, _ in rows]) if rows else np.zeros((0, 4), np.float32)
        scores = np.concatenate([s for _, s in rows]) if rows else np.zeros((0,), np.float32)
        counts = np.array([len(b) for b, _ in rows], dtype=np.int64)
        _atomic_write(
            path,
            lambda f: np.savez_compressed(
                f, image_ids=image_ids, boxes=boxes, scores=scores, counts=counts, meta=np.array(meta_text)
            ),
        )
    else:
        doc = {k: {"boxes": b.tolist(), "scores": s.tolist()} for k, (b, s) in table.items()}
        doc[META_KEY] = meta
        _atomic_write(path, lambda f: f.write(json.dumps(doc).encode("utf-8")))
    return path


# -- reading ------------------------------------------------------------------------------
def _load_npz(path: Path) -> Tuple[ProposalTable, dict]:
    # np.load would try to unpickle anything that is not a zip or .npy: say what it is instead
    if not zipfile.is_zipfile(path):
        raise ProposalFileError(f"proposal file {path}: not an .npz archive (truncated or corrupt?)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("image_ids", "boxes", "scores", "counts") if k not in npz.files]
            if missing:
                raise ProposalFileError(f"proposal file {path}: missing arrays {missing} (has {sorted(npz.files)})")
            data = {k: npz[k] for k in ("image_ids", "boxes", "scores", "counts")}
            meta_arr = npz["meta"] if "meta" in npz.files else None
    except ProposalFileError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise ProposalFileError(
                f"proposal file {path}: holds pickled (object) arrays, which detkit never loads"
            ) from None
        raise ProposalFileError(f"proposal file {path}: cannot read ({str(exc).splitlines()[0][:200]})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise ProposalFileError(f"proposal file {path}: not a readable .npz (truncated or corrupt? {msg})") from None

    ids, boxes, scores, counts = data["image_ids"], data["boxes"], data["scores"], data["counts"]
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        raise ProposalFileError(
            f"proposal file {path}: image_ids must be a 1-d string array, got shape {ids.shape} dtype {ids.dtype}"
        )
    if counts.ndim != 1 or counts.dtype.kind not in "iu" or len(counts) != len(ids):
        raise ProposalFileError(
            f"proposal file {path}: counts must be {len(ids)} integers (one per image id), "
            f"got shape {counts.shape} dtype {counts.dtype}"
        )
    if (counts < 0).any():
        raise ProposalFileError(f"proposal file {path}: counts must be >= 0")
    if boxes.ndim != 2 or boxes.shape[1:] != (4,) or boxes.dtype.kind not in "fiu":
        raise ProposalFileError(
            f"proposal file {path}: boxes must be an (M, 4) number array, got shape {boxes.shape} dtype {boxes.dtype}"
        )
    if scores.ndim != 1 or len(scores) != len(boxes) or scores.dtype.kind not in "fiu":
        raise ProposalFileError(
            f"proposal file {path}: scores must be ({len(boxes)},) numbers, "
            f"got shape {scores.shape} dtype {scores.dtype}"
        )
    if int(counts.sum()) != len(boxes):
        raise ProposalFileError(
            f"proposal file {path}: counts add up to {int(counts.sum())} but there are {len(boxes)} boxes"
        )
    meta = {}
    if meta_arr is not None:
        try:
            meta = json.loads(str(meta_arr[()]))
        except (ValueError, TypeError, IndexError):
            raise ProposalFileError(f"proposal file {path}: meta is not a JSON string") from None
        if not isinstance(meta, dict):
            raise ProposalFileError(f"proposal file {path}: meta must be a JSON object")
    ends = np.cumsum(counts)
    table: ProposalTable = {}
    for image_id, end, n in zip(ids.tolist(), ends.tolist(), counts.tolist()):
        image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
        if image_id in table:
            raise ProposalFileError(f"proposal file {path}: image id {image_id!r} appears twice")
        table[image_id] = _check_image(path, image_id, boxes[end - n : end], scores[end - n : end])
    return table, meta


def _load_json(path: Path) -> Tuple[ProposalTable, dict]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProposalFileError(f"proposal file {path}: cannot read ({exc.__class__.__name__})") from None
    except ValueError as exc:
        raise ProposalFileError(f"proposal file {path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ProposalFileError(
            f"proposal file {path}: expected a JSON object image_id -> {{boxes, scores}}, got {type(doc).__name__}"
        )
    meta = doc.pop(META_KEY, {})
    if not isinstance(meta, dict):
        raise ProposalFileError(f"proposal file {path}: {META_KEY} must be an object")
    table: ProposalTable = {}
    for image_id, entry in doc.items():
        if isinstance(entry, list):  # a bare list of boxes, in rank order
            entry = {"boxes": entry}
        if not isinstance(entry, dict) or "boxes" not in entry:
            raise ProposalFileError(f"proposal file {path}: image {image_id!r} needs a 'boxes' list")
        boxes = entry["boxes"]
        scores = entry.get("scores")
        if scores is None:
            scores = rank_scores(len(boxes) if isinstance(boxes, list) else 0)
        table[str(image_id)] = _check_image(path, image_id, boxes, scores)
    return table, meta


def load_proposals(path) -> Tuple[ProposalTable, dict]:
    """-> ({image_id (str): (boxes (R, 4) float32 xyxy original pixels, scores (R,) float32)},
    meta). Reads .npz, .json and classic Selective Search .mat files (``read_mat``)."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise ProposalFileError(f"proposal file not found: {path}")
    if suffix == ".npz":
        return _load_npz(path)
    if suffix == ".json":
        return _load_json(path)
    return read_mat(path), {"method": "selective_search", "source": "mat", "file": path.name}


# -- the classic .mat release -------------------------------------------------------------
def _mat_string(value, path, index) -> str:
    arr = np.asarray(value)
    if arr.dtype.kind in "US" and arr.size >= 1:
        # a cell holds ['000005'] (one string) or, from some writers, one char per element
        return "".join(x.decode() if isinstance(x, bytes) else str(x) for x in arr.ravel()).strip()
    if arr.dtype.kind in "iuf" and arr.size == 1:  # numeric ids (e.g. COCO)
        v = arr.ravel()[0]
        return str(int(v)) if float(v).is_integer() else str(v)
    raise ProposalFileError(f"proposal file {path}: images[{index}] is not a string id")


def read_mat(mat_path, image_ids: Optional[Sequence] = None) -> ProposalTable:
    """Read the classic Selective Search .mat (R-CNN / Fast R-CNN ``selective_search_data``):
    ``boxes`` a cell array of (R, 4) [y1 x1 y2 x2] 1-based inclusive pixels, ``images`` a cell
    array of ids (or pass ``image_ids``, in the order of ``boxes``). Boxes become detkit's
    (x1 - 1, y1 - 1, x2, y2); file order is the rank (scores ``rank_scores``)."""
    import scipy.io

    path = Path(mat_path)
    if not path.is_file():
        raise ProposalFileError(f"proposal file not found: {path}")
    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise ProposalFileError(
            f"proposal file {path}: MATLAB v7.3 (HDF5) files are not supported; re-save with save(..., '-v7')"
        ) from None
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError... for bad files
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise ProposalFileError(f"proposal file {path}: not a readable .mat ({msg})") from None
    if "boxes" not in mat:
        names = sorted(k for k in mat if not k.startswith("__"))
        raise ProposalFileError(f"proposal file {path}: no 'boxes' variable (has {names})")
    boxes_var = np.asarray(mat["boxes"])
    # A cell array holds one matrix per image; one image may be saved as a plain matrix.
    cells: List[np.ndarray] = list(boxes_var.ravel()) if boxes_var.dtype == object else [boxes_var]
    if image_ids is not None:
        ids = [str(i) for i in image_ids]
    elif "images" in mat:
        raw = np.asarray(mat["images"])
        if raw.dtype.kind == "U" and raw.ndim == 2 and raw.dtype != object:
            ids = ["".join(row).strip() for row in raw]  # a MATLAB char matrix, one row per id
        elif raw.dtype.kind == "U":
            ids = [str(x).strip() for x in raw.ravel()]
        else:
            ids = [_mat_string(v, path, i) for i, v in enumerate(raw.ravel())]
    else:
        raise ProposalFileError(f"proposal file {path}: no 'images' variable; pass image_ids")
    if len(ids) != len(cells):
        raise ProposalFileError(f"proposal file {path}: {len(cells)} box arrays but {len(ids)} image ids")
    table: ProposalTable = {}
    for image_id, cell in zip(ids, cells):
        yxyx = np.asarray(cell, dtype=np.float64)  # before the -1: stored uint16 would wrap
        if yxyx.size == 0:
            yxyx = yxyx.reshape(0, 4)
        if yxyx.ndim != 2 or yxyx.shape[1] != 4:
            raise ProposalFileError(
                f"proposal file {path}: image {image_id!r} boxes must have shape (R, 4), got {yxyx.shape}"
            )
        xyxy = np.stack([yxyx[:, 1] - 1, yxyx[:, 0] - 1, yxyx[:, 3], yxyx[:, 2]], axis=1)
        if image_id in table:
            raise ProposalFileError(f"proposal file {path}: image id {image_id!r} appears twice")
        table[image_id] = _check_image(path, image_id, xyxy, rank_scores(len(xyxy)))
    return table


def convert_mat(mat_path, out_path, image_ids: Optional[Sequence] = None, meta: Optional[dict] = None) -> Path:
    """Classic Selective Search .mat -> detkit .npz/.json (see ``read_mat``)."""
    table = read_mat(mat_path, image_ids)
    info = {"method": "selective_search", "source": Path(mat_path).name, **(meta or {})}
    return save_proposals(out_path, table, info)


def export_mat(proposals, mat_path) -> Path:
    """detkit proposals (a file path or a table) -> the classic .mat layout (``boxes`` cells
    of [y1 x1 y2 x2] 1-based inclusive doubles, ``images`` cells of ids), e.g. for MATLAB
    code of the R-CNN era. Scores are not stored: the row order carries the rank."""
    import scipy.io

    if isinstance(proposals, (str, os.PathLike)):
        table = load_proposals(proposals)[0]
    else:
        table = _as_table(mat_path, proposals)
    ids = list(table)
    boxes = np.empty((1, len(ids)), dtype=object)
    images = np.empty((1, len(ids)), dtype=object)
    for j, image_id in enumerate(ids):
        b, s = table[image_id]
        b = b[np.argsort(-s, kind="stable")].astype(np.float64)
        boxes[0, j] = np.stack([b[:, 1] + 1, b[:, 0] + 1, b[:, 3], b[:, 2]], axis=1).reshape(-1, 4)
        images[0, j] = image_id
    path = Path(mat_path)
    _atomic_write(path, lambda f: scipy.io.savemat(f, {"boxes": boxes, "images": images}))
    return path


def convert_json(json_path, out_path, meta: Optional[dict] = None) -> Path:
    """A json proposal file (scores optional; boxes xyxy original pixels) -> .npz (or .json)."""
    table, old_meta = load_proposals(json_path)
    return save_proposals(out_path, table, {**old_meta, **(meta or {})})
