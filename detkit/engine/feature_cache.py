"""The feature cache of R-CNN's and SPP-net's offline stages: the region features of the
training split, extracted once after fine-tuning and read by the SVM and box-regression
stages (R-CNN sec. 2.3 cached them on disk the same way; rcnn_cache_pool5_features.m).

Shapes: N training images, R regions of one image (its ground-truth rows first, then its
proposals), K foreground classes, D the SVMs' feature width, P the regions of one image that
train box regression, Dp the pool5 width.

A cache is a folder:

    cache.json           manifest: format, version, the fingerprints of the config and of the
                         model weights the features came from, N, images per chunk, widths,
                         dtype, ``complete`` (and at the end: sizes, counts)
    chunk_00000.npz ...  images [c * n, (c + 1) * n) of the split, in dataset order

Each chunk is a plain ``np.savez`` archive (never pickles; loaded with allow_pickle=False),
written atomically (temporary file + rename: a killed run leaves whole chunks only), with

    image_ids (n,) str, counts (n,) int64 regions per image, num_proposals (n,) int64,
    unreadable (n,) bool, boxes (M, 4) float32 (network-input pixels), gt_class (M,) int64
    (class 1..K of a ground-truth row, 0 for a proposal), overlaps (M, K) float32 (IoU with the
    closest ground-truth box of each class, difficult ones included), features (M, D) float16
    or float32, feature_norms (M,) and pool5_norms (M,) float32 (L2 norms before storage, for
    the feature scale), reg_counts (n,) int64, reg_rows (Q,) int64 (row within its image),
    reg_features (Q, Dp), reg_gt (Q, 4) float32, reg_class (Q,) int64, reg_iou (Q,) float32:
    the regions whose best IoU with a ground-truth box reaches the box-regression threshold.

A cache made for another config or from other weights is refused with one line naming the
folder (nothing is overwritten: delete it to recompute); a chunk that does not read is a
one-line error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from detkit.engine.checkpoint import atomic_write_text
from detkit.errors import FeatureCacheError

CACHE_FORMAT = "detkit-feature-cache"
CACHE_VERSION = 1
MANIFEST = "cache.json"
_CHUNK = "chunk_{:05d}.npz"
_ARRAYS = (
    "image_ids",
    "counts",
    "num_proposals",
    "unreadable",
    "boxes",
    "gt_class",
    "overlaps",
    "features",
    "feature_norms",
    "pool5_norms",
    "reg_counts",
    "reg_rows",
    "reg_features",
    "reg_gt",
    "reg_class",
    "reg_iou",
)


@dataclass
class ImageRegions:
    """The cached regions of one training image (see the module doc for the arrays)."""

    image_id: str
    boxes: np.ndarray
    gt_class: np.ndarray
    overlaps: np.ndarray
    features: np.ndarray
    feature_norms: np.ndarray
    pool5_norms: np.ndarray
    reg_rows: np.ndarray
    reg_features: np.ndarray
    reg_gt: np.ndarray
    reg_class: np.ndarray
    reg_iou: np.ndarray
    num_proposals: int = 0
    unreadable: bool = False

    @staticmethod
    def empty(image_id: str, num_classes: int, dim: int, pool5_dim: int, dtype, unreadable: bool) -> "ImageRegions":
        """No regions (an unreadable image)."""
        return ImageRegions(
            str(image_id),
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.int64),
            np.zeros((0, num_classes), np.float32),
            np.zeros((0, dim), dtype),
            np.zeros((0,), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0,), np.int64),
            np.zeros((0, pool5_dim), dtype),
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.int64),
            np.zeros((0,), np.float32),
            0,
            unreadable,
        )


def state_fingerprint(model: nn.Module, exclude: Sequence[str] = ()) -> str:
    """sha256 (16 hex digits) over the model's state dict, entries starting with one of
    ``exclude`` left out (the SVM / box-regression buffers the later stages fill)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if any(name.startswith(prefix) for prefix in exclude):
            continue
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        digest.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def json_fingerprint(value) -> str:
    """sha256 (16 hex digits) of a JSON-serialisable value, keys sorted."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _human(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


class FeatureCache:
    """One cache folder (see the module doc). Use ``create_or_resume`` to write and ``open``
    to read; ``image(i)`` keeps the last chunk it read in memory (the stages read images in
    order, so each chunk is read once per pass)."""

    def __init__(self, folder, manifest: Dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self._loaded: Optional[int] = None
        self._images: List[ImageRegions] = []

    # -- layout ------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def images_per_chunk(self) -> int:
        return int(self.manifest["images_per_chunk"])

    @property
    def num_chunks(self) -> int:
        return (self.num_images + self.images_per_chunk - 1) // self.images_per_chunk

    def chunk_path(self, c: int) -> Path:
        return self.folder / _CHUNK.format(c)

    def chunk_indices(self, c: int) -> List[int]:
        start = c * self.images_per_chunk
        return list(range(start, min(start + self.images_per_chunk, self.num_images)))

    def missing_chunks(self) -> List[int]:
        return [c for c in range(self.num_chunks) if not self.chunk_path(c).is_file()]

    def size_bytes(self) -> int:
        return sum(self.chunk_path(c).stat().st_size for c in range(self.num_chunks) if self.chunk_path(c).is_file())

    def describe(self) -> str:
        return f"{self.num_images} images, {_human(self.size_bytes())} in {self.folder}"

    # -- creating / opening --------------------------------------------------------------------
    @staticmethod
    def _read_manifest(folder: Path) -> Optional[Dict]:
        path = folder / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise FeatureCacheError(f"feature cache {folder}: {MANIFEST} is not readable JSON (corrupt?)") from None
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            raise FeatureCacheError(f"feature cache {folder}: {MANIFEST} is not a detkit feature-cache manifest")
        if manifest.get("version") != CACHE_VERSION:
            raise FeatureCacheError(
                f"feature cache {folder}: version {manifest.get('version')} (this detkit reads {CACHE_VERSION}); "
                "delete the folder to recompute it"
            )
        return manifest

    @staticmethod
    def _refuse_other(folder: Path, manifest: Dict, config_fp: str, weights_fp: Optional[str]) -> None:
        if manifest.get("config_fingerprint") != config_fp:
            raise FeatureCacheError(
                f"feature cache {folder} was made for another config (fingerprint "
                f"{manifest.get('config_fingerprint')}, this run {config_fp}); delete that folder to recompute it, "
                "or set model.roi_head.svm.cache_dir to another folder"
            )
        if weights_fp is not None and manifest.get("weights_fingerprint") != weights_fp:
            raise FeatureCacheError(
                f"feature cache {folder} was made from other model weights (fingerprint "
                f"{manifest.get('weights_fingerprint')}, this model {weights_fp}: fine-tuning ran again?); "
                "delete that folder to recompute it"
            )

    @classmethod
    def is_complete(cls, folder, config_fp: str) -> bool:
        """Whether ``folder`` holds a finished cache for this config (the weights are not
        checked: ``open`` does)."""
        try:
            manifest = cls._read_manifest(Path(folder))
        except FeatureCacheError:
            return False
        return bool(manifest and manifest.get("complete") and manifest.get("config_fingerprint") == config_fp)

    @classmethod
    def create_or_resume(cls, folder, manifest: Dict) -> "FeatureCache":
        """A cache to write: a new one in an absent or empty ``folder``, or the partial or
        finished one already there when it was made for the same config and weights
        (``manifest["config_fingerprint"]`` / ``["weights_fingerprint"]``); anything else in
        the folder is refused (FeatureCacheError), never overwritten."""
        folder = Path(folder)
        manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **manifest, "complete": False}
        existing = cls._read_manifest(folder) if folder.is_dir() else None
        if existing is None:
            if folder.is_dir() and any(folder.iterdir()):
                raise FeatureCacheError(
                    f"feature cache folder {folder} holds files but no {MANIFEST}: not a detkit feature cache, "
                    "refusing to write into it (choose another model.roi_head.svm.cache_dir)"
                )
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            return cls(folder, manifest)
        cls._refuse_other(folder, existing, manifest["config_fingerprint"], manifest["weights_fingerprint"])
        for key in ("num_images", "images_per_chunk", "feature_dim", "pool5_dim", "num_classes"):
            if existing.get(key) != manifest.get(key):
                raise FeatureCacheError(
                    f"feature cache {folder}: {key} {existing.get(key)} differs from this run's {manifest.get(key)}; "
                    "delete the folder to recompute it"
                )
        return cls(folder, existing)

    @classmethod
    def open(cls, folder, config_fp: str, weights_fp: Optional[str] = None) -> "FeatureCache":
        """A finished cache to read, made for this config (and these weights, when given)."""
        folder = Path(folder)
        manifest = cls._read_manifest(folder) if folder.is_dir() else None
        if manifest is None:
            raise FeatureCacheError(f"feature cache {folder} not found (the cache_features stage writes it)")
        cls._refuse_other(folder, manifest, config_fp, weights_fp)
        if not manifest.get("complete"):
            raise FeatureCacheError(
                f"feature cache {folder} is incomplete (a killed run?): detkit train --resume finishes it"
            )
        return cls(folder, manifest)

    def finish(self, **summary) -> None:
        """Mark the cache complete, recording ``summary`` (counts) and its size."""
        missing = self.missing_chunks()
        if missing:
            raise FeatureCacheError(f"feature cache {self.folder}: chunk {self.chunk_path(missing[0]).name} is missing")
        self.manifest.update(summary, complete=True, bytes=self.size_bytes())
        atomic_write_text(self.folder / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")

    # -- chunks --------------------------------------------------------------------------------
    def write_chunk(self, c: int, images: Sequence[ImageRegions]) -> Path:
        """Chunk ``c`` (its images in order), atomically."""
        expected = len(self.chunk_indices(c))
        if len(images) != expected:
            raise ValueError(f"chunk {c} holds {expected} images, got {len(images)}")

        def cat(name: str, width: Optional[int], dtype) -> np.ndarray:
            parts = [np.asarray(getattr(r, name)) for r in images]
            if parts:
                return np.concatenate(parts).astype(dtype, copy=False)
            return np.zeros((0,) if width is None else (0, width), dtype)

        dtype = np.dtype(self.manifest["dtype"])
        k, d, dp = self.manifest["num_classes"], self.manifest["feature_dim"], self.manifest["pool5_dim"]
        arrays = {
            "image_ids": np.array([r.image_id for r in images], dtype=str),
            "counts": np.array([len(r.boxes) for r in images], np.int64),
            "num_proposals": np.array([r.num_proposals for r in images], np.int64),
            "unreadable": np.array([r.unreadable for r in images], bool),
            "boxes": cat("boxes", 4, np.float32),
            "gt_class": cat("gt_class", None, np.int64),
            "overlaps": cat("overlaps", k, np.float32),
            "features": cat("features", d, dtype),
            "feature_norms": cat("feature_norms", None, np.float32),
            "pool5_norms": cat("pool5_norms", None, np.float32),
            "reg_counts": np.array([len(r.reg_rows) for r in images], np.int64),
            "reg_rows": cat("reg_rows", None, np.int64),
            "reg_features": cat("reg_features", dp, dtype),
            "reg_gt": cat("reg_gt", 4, np.float32),
            "reg_class": cat("reg_class", None, np.int64),
            "reg_iou": cat("reg_iou", None, np.float32),
        }
        path = self.chunk_path(c)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types the first keyword
            # mkstemp makes the file private (0600); give it the permissions open() would
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except OSError as exc:
            raise FeatureCacheError(f"cannot write feature cache chunk {path}: {exc.strerror or exc}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def _load_arrays(self, c: int, names: Iterable[str]) -> Dict[str, np.ndarray]:
        path = self.chunk_path(c)
        names = list(names)
        bad = f"feature cache chunk {path} is corrupt or truncated"
        hint = "delete it and run detkit train --resume to recompute it"
        if not path.is_file():
            raise FeatureCacheError(f"feature cache chunk {path} is missing; {hint}")
        if not zipfile.is_zipfile(path):
            raise FeatureCacheError(f"{bad} (not an .npz archive); {hint}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [n for n in names if n not in npz.files]
                if missing:
                    raise FeatureCacheError(f"{bad} (no arrays {missing}); {hint}")
                return {n: npz[n] for n in names}
        except FeatureCacheError:
            raise
        except Exception as exc:  # zlib / zipfile / numpy format errors of a damaged file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise FeatureCacheError(f"{bad} ({reason}); {hint}") from None

    def read_chunk(self, c: int) -> List[ImageRegions]:
        """The images of chunk ``c``, checked against the manifest (one-line error naming the
        file otherwise)."""
        a = self._load_arrays(c, _ARRAYS)
        path = self.chunk_path(c)
        n = len(self.chunk_indices(c))
        counts, reg_counts = a["counts"], a["reg_counts"]
        m, q = int(counts.sum()) if len(counts) else 0, int(reg_counts.sum()) if len(reg_counts) else 0
        k, d, dp = self.manifest["num_classes"], self.manifest["feature_dim"], self.manifest["pool5_dim"]
        shapes = {
            "image_ids": (n,),
            "counts": (n,),
            "num_proposals": (n,),
            "unreadable": (n,),
            "boxes": (m, 4),
            "gt_class": (m,),
            "overlaps": (m, k),
            "features": (m, d),
            "feature_norms": (m,),
            "pool5_norms": (m,),
            "reg_counts": (n,),
            "reg_rows": (q,),
            "reg_features": (q, dp),
            "reg_gt": (q, 4),
            "reg_class": (q,),
            "reg_iou": (q,),
        }
        for name, shape in shapes.items():
            if tuple(a[name].shape) != shape:
                raise FeatureCacheError(
                    f"feature cache chunk {path}: {name} has shape {tuple(a[name].shape)}, expected {shape} "
                    "(corrupt, or written by another config); delete it and run detkit train --resume"
                )
        ends, reg_ends = np.cumsum(counts), np.cumsum(reg_counts)
        out = []
        for i in range(n):
            lo, hi = int(ends[i] - counts[i]), int(ends[i])
            rlo, rhi = int(reg_ends[i] - reg_counts[i]), int(reg_ends[i])
            out.append(
                ImageRegions(
                    str(a["image_ids"][i]),
                    a["boxes"][lo:hi],
                    a["gt_class"][lo:hi],
                    a["overlaps"][lo:hi],
                    a["features"][lo:hi],
                    a["feature_norms"][lo:hi],
                    a["pool5_norms"][lo:hi],
                    a["reg_rows"][rlo:rhi],
                    a["reg_features"][rlo:rhi],
                    a["reg_gt"][rlo:rhi],
                    a["reg_class"][rlo:rhi],
                    a["reg_iou"][rlo:rhi],
                    int(a["num_proposals"][i]),
                    bool(a["unreadable"][i]),
                )
            )
        return out

    def check_chunk(self, c: int, image_ids: Sequence[str]) -> None:
        """A chunk already on disk (resume) holds these images, and reads."""
        ids = [str(i) for i in self._load_arrays(c, ["image_ids"])["image_ids"]]
        if ids != [str(i) for i in image_ids]:
            raise FeatureCacheError(
                f"feature cache chunk {self.chunk_path(c)} holds other images than the training split's "
                f"{c}th chunk (dataset changed?); delete the cache folder to recompute it"
            )

    def image(self, i: int) -> ImageRegions:
        c = i // self.images_per_chunk
        if self._loaded != c:
            self._images = self.read_chunk(c)
            self._loaded = c
        return self._images[i - c * self.images_per_chunk]

    def norms(self, name: str) -> np.ndarray:
        """All rows' ``feature_norms`` or ``pool5_norms`` (only that array is read)."""
        parts = [self._load_arrays(c, [name])[name] for c in range(self.num_chunks)]
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    def regression_samples(self) -> Dict[str, np.ndarray]:
        """The box-regression rows of every image: features (Q, Dp) as stored, boxes (Q, 4)
        (the regions), gt (Q, 4), classes (Q,), ious (Q,); only those arrays are read."""
        parts: Dict[str, List[np.ndarray]] = {"features": [], "boxes": [], "gt": [], "classes": [], "ious": []}
        names = ["counts", "boxes", "reg_counts", "reg_rows", "reg_features", "reg_gt", "reg_class", "reg_iou"]
        for c in range(self.num_chunks):
            a = self._load_arrays(c, names)
            # reg_rows index the rows of their own image: offset them to the chunk's rows
            starts = np.repeat(np.cumsum(a["counts"]) - a["counts"], a["reg_counts"])
            parts["features"].append(a["reg_features"])
            parts["boxes"].append(a["boxes"][a["reg_rows"] + starts])
            parts["gt"].append(a["reg_gt"])
            parts["classes"].append(a["reg_class"])
            parts["ious"].append(a["reg_iou"])
        dp = int(self.manifest["pool5_dim"])
        empty = {
            "features": np.zeros((0, dp), np.dtype(self.manifest["dtype"])),
            "boxes": np.zeros((0, 4), np.float32),
            "gt": np.zeros((0, 4), np.float32),
            "classes": np.zeros((0,), np.int64),
            "ious": np.zeros((0,), np.float32),
        }
        return {k: np.concatenate([empty[k]] + v) for k, v in parts.items()}
