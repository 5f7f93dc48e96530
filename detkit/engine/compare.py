"""``detkit compare``: the lineage side by side, every stage trained and measured on the same
data, with the same backbone and the same Selective Search proposals.

Shapes / names: a *stage* is one row of the comparison (R-CNN, SPP-net, Fast R-CNN, Faster
R-CNN, the SVD variants); a *recipe* (shapes, bccd) says which config each stage starts
from.

A stage is a config plus how to build its run:

    STAGES    the rows, in lineage order: key (run folder), label, config family (the folder
              under configs/), proposal source, and for an SVD variant the stage whose
              trained model it compresses (Fast R-CNN sec. 3.1)
    RECIPES   per recipe: the base config of each family (``configs/<family>/<name>.yaml``),
              the backbone every stage gets, the Selective Search settings of the shared
              proposal files, the SVD ranks

For a trained stage the base config is composed with (``compose_stage_config``): the dataset
config's keys (its data.train / data.test replace the recipe's whole), the recipe's backbone
keys (``--backbone`` replaces them), the budget (``--iters``: max_iter, with steps, warmup and
checkpoint period scaled alike), the shared Selective Search files for the stages that use
them (``model.proposals.method: precomputed``), the metrics (voc with voc07) and the command
line's ``key=value`` overrides. The composed config is written to ``OUT/configs/<key>.yaml``
and trained by ``detkit train``'s own code into ``OUT/<key>/`` (``train_fn``, handed in by
the command line), so a row is exactly what ``detkit train OUT/configs/<key>.yaml`` gives.
The backbone's layout (FPN or the single C4 map) stays each stage's own.

Resumable: a stage folder whose run finished is loaded, not retrained; an unfinished one is
resumed (``--resume``); a folder holding a run of another config is refused for that row
(nothing is overwritten). Selective Search files go to ``OUT/proposals/`` through the
resumable proposal dump (``engine.proposals``), unless ``--proposals TRAIN TEST`` names them.
SVD variants (``OUT/<key>_svd/``) and the timings are redone only when their input changed.

Measured per row: mAP (voc, voc07) from the run's evaluation; training minutes (the run's
``*_minutes`` records in metrics.jsonl); test seconds per image split into proposals /
features / head by the Detector's own timers (``engine.profile``: batch 1, every model
taking turns on the same test images), where a precomputed file's proposal time is
Selective Search's own ``seconds_per_image`` from the file's meta; parameters and state size.

A config that does not exist yet makes its row "pending" with the reason; a stage that fails
(missing proposal file, a config that does not build, an exception while training) is
"failed" with its one-line reason, and the other rows go on. The report (``compare.md``,
``compare.json``, ``compare.png``: mAP against test s/img on a log axis) checks the papers'
relationships on this data and says where they do not hold.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from detkit.config import apply_overrides, dump_config, from_dict, load_config, load_yaml, to_dict
from detkit.data.build import build_dataset, dataset_transforms
from detkit.data.proposal_files import load_proposals
from detkit.engine.checkpoint import FINAL_NAME, atomic_write_text
from detkit.engine.compress import box_head_of, compress_model, save_compressed
from detkit.engine.evaluate import evaluate_detections, write_evaluation
from detkit.engine.inference import device_from_config, run_inference
from detkit.engine.predictor import model_from_checkpoint
from detkit.engine.profile import count_parameters, profile_detectors, state_megabytes
from detkit.engine.proposals import ProposalJob, check_proposal_files, compute_proposals
from detkit.engine.stages import read_run_state
from detkit.errors import ConfigError, DetkitError, UsageError
from detkit.schema import Config

logger = logging.getLogger("detkit")

#: The configs/ folder of this checkout (recipes name their configs relative to it).
CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class StageSpec:
    """One row. family: the configs/ folder of its base config (None for an SVD variant);
    proposals: "selective_search" (the shared files) or "rpn" (its own); svd_of: the stage
    whose trained model an SVD variant compresses; source: where a pending config comes from."""

    key: str
    label: str
    family: Optional[str]
    proposals: str
    svd_of: Optional[str] = None
    source: str = ""


STAGES: Tuple[StageSpec, ...] = (
    StageSpec("rcnn", "R-CNN (SVMs)", "rcnn", "selective_search", source="issue 9"),
    StageSpec("spp", "SPP-net", "spp", "selective_search", source="issue 9"),
    StageSpec("fast_rcnn", "Fast R-CNN", "fast_rcnn", "selective_search"),
    StageSpec("fast_rcnn_svd", "Fast R-CNN + SVD", None, "selective_search", svd_of="fast_rcnn"),
    StageSpec("faster_rcnn", "Faster R-CNN", "faster_rcnn", "rpn"),
    StageSpec("faster_rcnn_svd", "Faster R-CNN + SVD", None, "rpn", svd_of="faster_rcnn"),
)
STAGE_KEYS = tuple(s.key for s in STAGES)


@dataclass(frozen=True)
class Recipe:
    """configs: family -> config file under configs/; backbone: model.backbone keys every
    stage gets; selective_search: mode / min_size / max_proposals of the shared files;
    svd_fraction: layer -> rank as a fraction of its output width (the paper keeps 1024 of
    fc6's 4096 and 256 of fc7's 4096 singular values, sec. 3.1 / Table 4); family_settings:
    family -> dotted keys a stage keeps from its own recipe over the dataset config's and the
    shared settings (an input scale or a proposal cap that is part of that paper's recipe)."""

    configs: Dict[str, str]
    backbone: Dict[str, Any]
    selective_search: Dict[str, Any]
    svd_fraction: Dict[str, float] = field(default_factory=lambda: {"fc6": 1024 / 4096, "fc7": 256 / 4096})
    family_settings: Dict[str, Dict[str, Any]] = field(default_factory=dict)


RECIPES: Dict[str, Recipe] = {
    # The quick-start networks on generated shapes (tiny ResNet from scratch, 160 px).
    "shapes": Recipe(
        configs={
            "rcnn": "rcnn/shapes.yaml",
            "spp": "spp/shapes.yaml",
            "fast_rcnn": "fast_rcnn/quickstart_shapes.yaml",
            "faster_rcnn": "faster_rcnn/quickstart_shapes.yaml",
        },
        backbone={"name": "tiny", "tiny_widths": [24, 48, 96, 192], "norm": "bn", "pretrained": None},
        selective_search={"mode": "fast", "min_size": 8.0, "max_proposals": 2000},
        # SPP-net pools conv5 (stride 16) of the whole image: at the dataset's 160 px a 16-64 px
        # shape spans 1-4 cells for a 6 x 6 pyramid level, so its recipe upscales to 256 px (as
        # SPP-net upscaled VOC's ~375 px images to 688 px, sec. 4.2; configs/spp/shapes.yaml).
        family_settings={
            "spp": {"data.input.min_size_train": [256], "data.input.max_size": 410, "data.input.min_size_test": 256}
        },
    ),
    # The BCCD recipes for a 2-core CPU (ResNet-18 from scratch, 384 px).
    "bccd": Recipe(
        configs={
            "rcnn": "rcnn/bccd_alexnet.yaml",
            "spp": "spp/bccd_alexnet.yaml",
            "fast_rcnn": "fast_rcnn/bccd_r18_fpn.yaml",
            "faster_rcnn": "faster_rcnn/bccd_r18_fpn.yaml",
        },
        backbone={"name": "resnet18", "norm": "bn", "pretrained": None},
        selective_search={"mode": "fast", "min_size": 20.0, "max_proposals": 2000},
        # R-CNN runs the network on every region, SPP-net's SVMs cache every region: on a CPU
        # their configs use the files' first 500 proposals per image (configs/rcnn/bccd_alexnet.yaml)
        family_settings={
            family: {"model.proposals.precomputed.max_proposals": 500, "model.roi_head.svm.max_proposals": 500}
            for family in ("rcnn", "spp")
        },
    ),
}


@dataclass
class CompareJob:
    """What ``detkit compare`` was asked (see cli/compare.py for the options)."""

    data: str
    out: str
    recipe: str = "shapes"
    backbone: Optional[str] = None
    iters: Optional[int] = None
    stages: Sequence[str] = STAGE_KEYS
    proposals: Optional[Sequence[str]] = None
    workers: int = 2
    time_images: int = 20
    svd: Optional[Dict[str, int]] = None
    overrides: Sequence[str] = ()
    progress: bool = True


@dataclass
class Row:
    key: str
    label: str
    proposals: str
    status: str = "pending"  # trained | loaded | pending | failed | skipped
    reason: str = ""
    config: Optional[str] = None
    run_dir: Optional[str] = None
    mAP_voc: Optional[float] = None
    mAP_voc07: Optional[float] = None
    train_minutes: Optional[float] = None
    # test s/img: proposals (Selective Search's own time for the shared files), features, head
    s_proposals: Optional[float] = None
    s_features: Optional[float] = None
    s_head: Optional[float] = None
    params: Optional[int] = None
    size_mb: Optional[float] = None
    svd: Optional[Dict[str, int]] = None

    @property
    def ok(self) -> bool:
        return self.status in ("trained", "loaded")

    @property
    def s_excl_proposals(self) -> Optional[float]:
        if self.s_features is None or self.s_head is None:
            return None
        return self.s_features + self.s_head

    @property
    def s_total(self) -> Optional[float]:
        rest = self.s_excl_proposals
        return None if rest is None or self.s_proposals is None else rest + self.s_proposals

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", " ".join(str(reason).split())


TrainFn = Callable[[Path, Path, bool], None]


# -- composing a stage's config ---------------------------------------------------------------
def _leaf_paths(data: Dict, prefix: str = "") -> Iterator[str]:
    """Dotted paths of the values a YAML dict sets; data.train / data.test count as one
    value each (a dataset replaces the recipe's whole)."""
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and path not in ("data.train", "data.test"):
            yield from _leaf_paths(value, path)
        else:
            yield path


def _get(data: Dict, path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


def _set(data: Dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[parts[-1]] = value


def budget_settings(train: Dict, iters: int) -> Dict[str, Any]:
    """--iters N: max_iter N; steps, warmup and checkpoint period scaled by N / max_iter (so
    the schedule keeps its shape); no periodic evaluation (compare evaluates at the end)."""
    f = iters / train["max_iter"]
    return {
        "train.max_iter": int(iters),
        "train.steps": [max(1, round(s * f)) for s in train["steps"]],
        "train.warmup_iters": round(train["warmup_iters"] * f),
        "train.checkpoint_period": max(1, round(train["checkpoint_period"] * f)) if train["checkpoint_period"] else 0,
        "train.eval_period": 0,
    }


def compose_stage_config(base: Path, data: Path, settings: Dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """base config + the dataset config's keys + ``settings`` (dotted key -> value) +
    ``overrides`` ("a.b=c"), validated."""
    cfg = to_dict(load_config(base, Config))
    raw, _ = load_yaml(data)
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
        raise ConfigError(f"{data}: compare needs a config with a data section (data.train, data.test)")
    resolved = to_dict(load_config(data, Config))
    for path in _leaf_paths(raw):
        _set(cfg, path, copy.deepcopy(_get(resolved, path)))
    if "train" in raw["data"] or "test" in raw["data"]:
        # other datasets: the recipe's class list does not apply (the data config's, or inferred)
        cfg["data"]["classes"] = resolved["data"]["classes"]
    if isinstance(settings.get("train.max_iter"), int) and "train.steps" not in settings:
        settings = {**settings, **budget_settings(cfg["train"], settings["train.max_iter"])}
    for path, value in settings.items():
        _set(cfg, path, copy.deepcopy(value))
    apply_overrides(cfg, list(overrides))
    return from_dict(Config, cfg)


def _flat(data: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(data, dict):
        out: Dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def config_differences(stored: Config, wanted: Config) -> List[str]:
    """Keys whose values differ (``detkit train`` fills data.classes in: not a difference)."""
    a, b = _flat(to_dict(stored)), _flat(to_dict(wanted))
    skip = {"data.classes"}
    return [k for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)]


# -- reading a finished run -------------------------------------------------------------------
def run_finished(run_dir: Path) -> bool:
    state = read_run_state(run_dir)
    stages = state.get("stages") or []
    return bool(stages) and state.get("finished") == stages and (run_dir / "eval.json").is_file()


def train_minutes(run_dir: Path) -> Optional[float]:
    """Sum of the run's ``*_minutes`` records (one per training session and offline stage)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    total, found = 0.0, False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        for key, value in record.items():
            if key.endswith("_minutes") and isinstance(value, (int, float)):
                total += float(value)
                found = True
    return total if found else None


def read_maps(eval_json: Path) -> Tuple[Optional[float], Optional[float]]:
    """(voc, voc07) mAP of an eval.json."""
    result = json.loads(eval_json.read_text(encoding="utf-8"))
    maps = {result.get("metric"): result.get("mAP")}
    maps.update({k: v.get("mAP") for k, v in (result.get("extra") or {}).items()})
    return maps.get("voc"), maps.get("voc07")


def _file_stamp(path: Path) -> Dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


# -- the comparison ---------------------------------------------------------------------------
class Comparison:
    """Runs a ``CompareJob`` (``run()``) -> rows; ``write()`` the report files."""

    def __init__(self, job: CompareJob, train_fn: TrainFn):
        if job.recipe not in RECIPES:
            raise UsageError(f"--recipe {job.recipe}: unknown (use {', '.join(RECIPES)})")
        unknown = [k for k in job.stages if k not in STAGE_KEYS]
        if unknown:
            raise UsageError(f"--stages: unknown stage {', '.join(unknown)} (stages: {', '.join(STAGE_KEYS)})")
        if not Path(job.data).is_file():
            raise UsageError(f"dataset config not found: {job.data}")
        if job.iters is not None and job.iters < 1:
            raise UsageError(f"--iters must be >= 1, got {job.iters}")
        if job.proposals is not None and len(job.proposals) != 2:
            raise UsageError("--proposals takes two files: the train split's and the test split's")
        self.job = job
        self.recipe = RECIPES[job.recipe]
        self.train_fn = train_fn
        self.out = Path(job.out)
        self.rows = {s.key: Row(s.key, s.label, s.proposals) for s in STAGES}
        self.cfgs: Dict[str, Config] = {}
        self.ss_files: Optional[List[Path]] = None
        self.ss_error: Optional[str] = None
        self.ss_seconds: Optional[float] = None

    # -- steps ---------------------------------------------------------------------------------
    def run(self) -> List[Row]:
        self.out.mkdir(parents=True, exist_ok=True)
        wanted = set(self.job.stages)
        for spec in STAGES:
            if spec.key not in wanted:
                self.rows[spec.key].status, self.rows[spec.key].reason = "skipped", "not in --stages"
        if any(s.proposals == "selective_search" and s.key in wanted and s.svd_of is None for s in STAGES):
            self.prepare_proposals()
        for spec in STAGES:
            if spec.key in wanted and spec.svd_of is None:
                self.guarded(spec, self.train_stage)
        for spec in STAGES:
            if spec.key in wanted and spec.svd_of is not None:
                self.guarded(spec, self.svd_stage)
        self.measure()
        return [self.rows[s.key] for s in STAGES]

    def guarded(self, spec: StageSpec, step: Callable[[StageSpec], None]) -> None:
        """Run one row's step; a failure marks the row with its one-line reason."""
        row = self.rows[spec.key]
        try:
            step(spec)
        except DetkitError as exc:
            row.fail(str(exc))
        except Exception as exc:  # a bug in one stage must not take the other rows down
            text = str(exc).strip().splitlines()
            row.fail(f"{type(exc).__name__}: {text[0] if text else ''}")
            where = self.out / spec.key
            where.mkdir(parents=True, exist_ok=True)
            (where / "compare_error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        if row.status == "failed":
            logger.warning("compare: %s failed: %s", spec.label, row.reason)

    def data_config(self) -> Config:
        return load_config(self.job.data, Config)

    def prepare_proposals(self) -> None:
        """The shared Selective Search files (computed into OUT/proposals when not given)."""
        ss = self.recipe.selective_search
        if self.job.proposals is not None:
            self.ss_files = [Path(p).resolve() for p in self.job.proposals]
        else:
            folder = self.out / "proposals"
            folder.mkdir(parents=True, exist_ok=True)
            self.ss_files = [(folder / f"ss_{ss['mode']}_{split}.npz").resolve() for split in ("train", "test")]
            try:
                data = self.data_config()
                for split, path in zip(("train", "test"), self.ss_files):
                    if path.is_file():
                        continue
                    ds_cfg = getattr(data.data, split)
                    if ds_cfg is None:
                        raise UsageError(f"{self.job.data}: no data.{split} dataset")
                    dataset = build_dataset(ds_cfg, data.data.classes, name=split)
                    job = ProposalJob(
                        method="selective_search",
                        mode=ss["mode"],
                        max_proposals=int(ss["max_proposals"]),
                        min_size=float(ss["min_size"]),
                        workers=self.job.workers,
                        progress=self.job.progress,
                        dataset_settings={"split": split, "data": str(Path(self.job.data).resolve())},
                    )
                    logger.info("compare: Selective Search (%s) on the %s split -> %s", ss["mode"], split, path)
                    compute_proposals(path, dataset, list(dataset.records), job)
            except DetkitError as exc:
                self.ss_error = f"Selective Search proposals: {' '.join(str(exc).split())}"
                logger.warning("compare: %s", self.ss_error)
        test_file = self.ss_files[1]
        if test_file.is_file():
            try:
                _, meta = load_proposals(test_file)
                value = meta.get("seconds_per_image")
                self.ss_seconds = float(value) if isinstance(value, (int, float)) else None
            except DetkitError:
                self.ss_seconds = None

    def stage_settings(self, spec: StageSpec) -> Dict[str, Any]:
        backbone = {"name": self.job.backbone} if self.job.backbone else self.recipe.backbone
        settings: Dict[str, Any] = {f"model.backbone.{k}": v for k, v in backbone.items()}
        settings.update({"test.metric": "voc", "test.extra_metrics": ["voc07"], "train.eval_period": 0})
        if self.job.iters is not None:
            settings["train.max_iter"] = int(self.job.iters)
        if spec.proposals == "selective_search":
            assert self.ss_files is not None
            ss = self.recipe.selective_search
            settings.update(
                {
                    "model.proposals.method": "precomputed",
                    "model.proposals.precomputed.path": [str(p) for p in self.ss_files],
                    "model.proposals.precomputed.max_proposals": int(ss["max_proposals"]),
                    "model.proposals.selective_search.mode": ss["mode"],
                    "model.proposals.selective_search.min_size": float(ss["min_size"]),
                    "model.proposals.selective_search.max_proposals": int(ss["max_proposals"]),
                }
            )
        settings.update(self.recipe.family_settings.get(spec.family or "", {}))
        return settings

    def train_stage(self, spec: StageSpec) -> None:
        row = self.rows[spec.key]
        assert spec.family is not None
        name = self.recipe.configs.get(spec.family)
        base = CONFIG_ROOT / name if name else None
        if base is None or not base.is_file():
            shown = f"configs/{name}" if name else f"a {spec.family} config"
            row.status, row.reason = "pending", f"{shown} does not exist yet ({spec.source or 'not written'})"
            return
        if spec.proposals == "selective_search" and self.ss_error:
            raise UsageError(self.ss_error)
        cfg = compose_stage_config(base, Path(self.job.data), self.stage_settings(spec), self.job.overrides)
        config_path = self.out / "configs" / f"{spec.key}.yaml"
        dump_config(cfg, config_path)
        row.config, self.cfgs[spec.key] = str(config_path), cfg
        if cfg.data.test is None:
            raise UsageError(f"{self.job.data}: compare needs a test split (data.test)")
        check_proposal_files(cfg, config_path)  # a missing file: the command that makes it
        run_dir = self.out / spec.key
        row.run_dir = str(run_dir)
        stored = run_dir / "config.yaml"
        if stored.is_file():
            differences = config_differences(load_config(stored, Config), cfg)
            if differences:
                shown = ", ".join(differences[:3]) + (f" (+{len(differences) - 3})" if len(differences) > 3 else "")
                raise UsageError(
                    f"{run_dir} holds a run of another config (differs in {shown}); "
                    "delete that folder or use another --out"
                )
        if run_finished(run_dir):
            row.status = "loaded"
            logger.info("compare: %s: finished run in %s, loaded", spec.label, run_dir)
        else:
            resume = any((run_dir / f).exists() for f in ("config.yaml", "run_state.json", "last_checkpoint"))
            logger.info("compare: %s: %s %s", spec.label, "resuming" if resume else "training", run_dir)
            self.train_fn(config_path, run_dir, resume)
            row.status = "trained"
        row.mAP_voc, row.mAP_voc07 = read_maps(run_dir / "eval.json")
        row.train_minutes = train_minutes(run_dir)

    def svd_ranks(self, model) -> Dict[str, int]:
        if self.job.svd:
            return dict(self.job.svd)
        box_head = box_head_of(model, "the trained model")
        ranks = {}
        for name, fraction in self.recipe.svd_fraction.items():
            layer = getattr(box_head, name, None)
            if layer is not None:
                ranks[name] = max(1, round(layer.out_features * fraction))
        return ranks

    def svd_stage(self, spec: StageSpec) -> None:
        row, base = self.rows[spec.key], self.rows[spec.svd_of or ""]
        if not base.ok:
            raise UsageError(f"needs the {base.label} model, which is {base.status}")
        base_ckpt = Path(base.run_dir or "") / FINAL_NAME
        run_dir = self.out / spec.key
        row.run_dir, row.config = str(run_dir), base.config
        record = run_dir / "compress.json"
        stamp = _file_stamp(base_ckpt)
        done = record.is_file() and (run_dir / "eval.json").is_file() and (run_dir / FINAL_NAME).is_file()
        if done and json.loads(record.read_text(encoding="utf-8")).get("source") == stamp:
            row.status = "loaded"
        else:
            cfg = self.cfgs[base.key]
            device = device_from_config(cfg.train.device)
            model, cfg, classes = model_from_checkpoint(base_ckpt, cfg, device)
            ranks = self.svd_ranks(model)
            start = time.perf_counter()
            compress_model(model, cfg, ranks, source=str(base_ckpt))
            save_compressed(model, cfg, classes, run_dir / FINAL_NAME, source=str(base_ckpt))
            seconds = time.perf_counter() - start
            test_set = build_dataset(cfg.data.test, classes, dataset_transforms(cfg.data.input, False), name="test")
            dets, _, sec = run_inference(
                model, test_set, cfg.data.test_batch_size, device, cfg.data.num_workers, progress=self.job.progress
            )
            result = evaluate_detections(cfg.test, dets, test_set)
            result["s_per_img"] = sec
            write_evaluation(result, dets, test_set, run_dir)
            info = {"source": stamp, "ranks": ranks, "seconds": seconds}
            atomic_write_text(record, json.dumps(info, indent=1) + "\n")
            row.status = "trained"
        info = json.loads(record.read_text(encoding="utf-8"))
        row.svd = info["ranks"]
        row.mAP_voc, row.mAP_voc07 = read_maps(run_dir / "eval.json")
        row.train_minutes = base.train_minutes

    def measure(self) -> None:
        """Timings (cached per checkpoint in OUT/<key>/compare_times.json), parameters and
        size of every row with a model; the rows needing a timing take turns."""
        entries, pending = {}, []
        device = None
        for spec in STAGES:
            row = self.rows[spec.key]
            if not row.ok:
                continue
            cfg_key = spec.svd_of or spec.key
            try:
                ckpt = Path(row.run_dir or "") / FINAL_NAME
                cfg = self.cfgs[cfg_key]
                device = device or device_from_config(cfg.train.device)
                model, mcfg, classes = model_from_checkpoint(ckpt, cfg if spec.svd_of is None else None, device)
                row.params, row.size_mb = count_parameters(model), round(state_megabytes(model), 3)
                cache = Path(row.run_dir or "") / "compare_times.json"
                stamp = {"checkpoint": _file_stamp(ckpt), "images": self.job.time_images}
                cached = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
                if cached.get("stamp") == stamp:
                    self._set_times(row, spec, cached["times"])
                    continue
                test_set = build_dataset(
                    mcfg.data.test, classes, dataset_transforms(mcfg.data.input, False), name="test"
                )
                entries[spec.key] = (model, test_set)
                pending.append((spec, cache, stamp))
            except DetkitError as exc:
                row.fail(f"measuring: {exc}")
        if not entries or self.job.time_images < 1:
            return
        if self.job.progress:
            logger.info("compare: timing %s on %d test images", ", ".join(entries), self.job.time_images)
        try:
            times = profile_detectors(entries, self.job.time_images, device)
        except DetkitError as exc:  # e.g. an unreadable test image: the rows keep their mAP
            for spec, _, _ in pending:
                self.rows[spec.key].reason = f"not timed: {' '.join(str(exc).split())}"
            return
        for spec, cache, stamp in pending:
            atomic_write_text(cache, json.dumps({"stamp": stamp, "times": times[spec.key]}, indent=1) + "\n")
            self._set_times(self.rows[spec.key], spec, times[spec.key])

    def _set_times(self, row: Row, spec: StageSpec, times: Dict[str, float]) -> None:
        row.s_features, row.s_head = times["features"], times["head"]
        if spec.proposals == "selective_search":
            # the file look-up is ~0; the proposals' real cost is Selective Search's own time
            row.s_proposals = None if self.ss_seconds is None else self.ss_seconds + times["proposals"]
        else:
            row.s_proposals = times["proposals"]

    # -- the report ----------------------------------------------------------------------------
    def rows_list(self) -> List[Row]:
        return [self.rows[s.key] for s in STAGES]

    def write(self) -> Dict[str, Path]:
        rows = self.rows_list()
        relations = relationships(rows)
        meta = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {'CUDA' if torch.cuda.is_available() else 'no GPU'}",
            "recipe": self.job.recipe,
            "data": str(Path(self.job.data).resolve()),
            "backbone": self.job.backbone or self.recipe.backbone,
            "iters": self.job.iters,
            "time_images": self.job.time_images,
            "selective_search": {**self.recipe.selective_search, "seconds_per_image": self.ss_seconds},
            "proposal_files": [str(p) for p in self.ss_files] if self.ss_files else None,
        }
        doc = {
            "meta": meta,
            "rows": [
                {
                    **asdict(r),
                    "s_excl_proposals": r.s_excl_proposals,
                    "s_total": r.s_total,
                }
                for r in rows
            ],
            "relationships": relations,
        }
        paths = {"json": self.out / "compare.json", "md": self.out / "compare.md", "png": self.out / "compare.png"}
        atomic_write_text(paths["json"], json.dumps(doc, indent=1) + "\n")
        atomic_write_text(paths["md"], format_markdown(rows, relations, meta) + "\n")
        plot_comparison(rows, paths["png"], title=f"{self.job.recipe}: {Path(self.job.data).name}")
        return paths


# -- relationships the papers report --------------------------------------------------------
def _ratio(slow: Optional[float], fast: Optional[float]) -> Optional[float]:
    return slow / fast if slow is not None and fast else None


def relationships(rows: Sequence[Row]) -> List[Dict[str, Any]]:
    """The papers' claims, each with what this comparison measured and whether it holds
    (None: cannot be checked, a row missing)."""
    by = {r.key: r for r in rows}

    def usable(*keys: str) -> bool:
        return all(by[k].ok for k in keys)

    out: List[Dict[str, Any]] = []

    def speed(claim: str, paper: str, slow: str, fast: str, low: float) -> None:
        ratio = _ratio(by[slow].s_excl_proposals, by[fast].s_excl_proposals) if usable(slow, fast) else None
        out.append(
            {
                "claim": claim,
                "paper": paper,
                "here": f"{ratio:.1f}x" if ratio is not None else f"n/a ({_states(by, slow, fast)})",
                "holds": None if ratio is None else ratio >= low,
            }
        )

    speed(
        "Fast R-CNN tests >= 10x faster than R-CNN (excluding proposal time)",
        "146x (Fast R-CNN Table 4, VGG-16, K40 GPU)",
        "rcnn",
        "fast_rcnn",
        10.0,
    )
    speed(
        "Fast R-CNN + SVD tests >= 10x faster than R-CNN (excluding proposals)",
        "213x (Table 4)",
        "rcnn",
        "fast_rcnn_svd",
        10.0,
    )
    speed(
        "SPP-net tests >= 10x faster than R-CNN (excluding proposals)",
        "24-102x (SPP-net abstract, sec. 4)",
        "rcnn",
        "spp",
        10.0,
    )
    for base, svd in (("fast_rcnn", "fast_rcnn_svd"), ("faster_rcnn", "faster_rcnn_svd")):
        label = by[base].label
        if usable(base, svd):
            b, s = by[base], by[svd]
            head = 100 * (s.s_head - b.s_head) / b.s_head if b.s_head and s.s_head is not None else None
            total = None
            if b.s_excl_proposals and s.s_excl_proposals is not None:
                total = 100 * (s.s_excl_proposals - b.s_excl_proposals) / b.s_excl_proposals
            drop = None if b.mAP_voc is None or s.mAP_voc is None else 100 * (s.mAP_voc - b.mAP_voc)
            here = (
                f"head {head:+.0f} %, detection (features + head) {total:+.0f} %, mAP {drop:+.2f} points"
                if head is not None and total is not None and drop is not None
                else "n/a (no timing)"
            )
            holds = None if total is None or drop is None else (total <= -30.0 and drop >= -0.5)
        else:
            here, holds = f"n/a ({_states(by, base, svd)})", None
        out.append(
            {
                "claim": f"SVD of fc6/fc7 cuts {label}'s detection time >= 30 % for <= 0.5 mAP points",
                "paper": "-30 % time, -0.3 mAP (Fast R-CNN sec. 3.1 / 5.4, fc6 1024 + fc7 256)",
                "here": here,
                "holds": holds,
            }
        )
    if usable("fast_rcnn", "faster_rcnn"):
        f, r = by["fast_rcnn"].s_total, by["faster_rcnn"].s_total
        ratio = _ratio(f, r)
        here = f"{ratio:.1f}x" if ratio is not None else "n/a (no Selective Search time in the proposal file)"
        holds = None if ratio is None else ratio > 1.0
    else:
        here, holds = f"n/a ({_states(by, 'fast_rcnn', 'faster_rcnn')})", None
    out.append(
        {
            "claim": "Faster R-CNN tests faster than Fast R-CNN + Selective Search end to end",
            "paper": "9.2x: 0.198 vs 1.83 s/img (Faster R-CNN Table 5, SS on a CPU, VGG-16)",
            "here": here,
            "holds": holds,
        }
    )

    def order(claim: str, paper: str, a: str, b: str, tolerance: float, approx: bool = False) -> None:
        map_a, map_b = by[a].mAP_voc, by[b].mAP_voc
        if usable(a, b) and map_a is not None and map_b is not None:
            diff = 100 * (map_a - map_b)
            here = f"{map_a:.4f} vs {map_b:.4f} ({diff:+.2f} points)"
            holds = abs(diff) <= tolerance if approx else diff >= -tolerance
        else:
            here, holds = f"n/a ({_states(by, a, b)})", None
        out.append({"claim": claim, "paper": paper, "here": here, "holds": holds})

    order("mAP: Faster R-CNN >= Fast R-CNN", "69.9 vs 66.9 (Faster R-CNN Table 3)", "faster_rcnn", "fast_rcnn", 0)
    order("mAP: Fast R-CNN >= SPP-net", "66.9 vs 63.1 (Fast R-CNN Table 1)", "fast_rcnn", "spp", 0.0)
    order(
        "mAP: SPP-net ~ R-CNN (within 2 points)",
        "59.2 vs 58.5 (SPP-net sec. 4, VOC07, ZF-5)",
        "spp",
        "rcnn",
        2.0,
        approx=True,
    )
    return out


def _states(by: Dict[str, Row], *keys: str) -> str:
    return ", ".join(f"{by[k].label} {by[k].status}" for k in keys if not by[k].ok) or "no numbers"


# -- the files --------------------------------------------------------------------------------
def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_markdown(rows: Sequence[Row], relations: Sequence[Dict], meta: Dict) -> str:
    lines = [
        f"# detkit compare: {meta['recipe']} ({Path(meta['data']).name})",
        "",
        f"{meta['date']}; {meta['machine']}; backbone {meta['backbone']}; "
        f"iterations {meta['iters'] or 'as the recipes'}; timed on {meta['time_images']} test images (batch 1).",
        "",
        "| stage | proposals | mAP voc | mAP voc07 | train min | test s/img | proposals | features | head "
        "| params (M) | size (MB) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        source = "Selective Search" if r.proposals == "selective_search" else "RPN"
        if r.svd:
            source += f"; SVD {', '.join(f'{k} {v}' for k, v in r.svd.items())}"
        status = r.status + (f": {r.reason}" if r.reason else "")
        lines.append(
            f"| {r.label} | {source} | {_fmt(r.mAP_voc)} | {_fmt(r.mAP_voc07)} | {_fmt(r.train_minutes, 1)} "
            f"| {_fmt(r.s_total)} | {_fmt(r.s_proposals)} | {_fmt(r.s_features)} | {_fmt(r.s_head)} "
            f"| {_fmt(None if r.params is None else r.params / 1e6, 2)} | {_fmt(r.size_mb, 1)} | {status} |"
        )
    ss = meta["selective_search"]
    lines += [
        "",
        f"Proposals column: Selective Search ({ss['mode']} mode, min size {ss['min_size']:g} px) "
        f"at {_fmt(ss['seconds_per_image'], 3)} s/img from its file's meta (computed once, on the CPU), "
        "or the RPN's measured time. test s/img = proposals + features + head.",
        "",
        "## The papers' relationships on this data",
        "",
        "| claim | paper | here | holds |",
        "|---|---|---|---|",
    ]
    for rel in relations:
        holds = {True: "yes", False: "**no**", None: "n/a"}[rel["holds"]]
        lines.append(f"| {rel['claim']} | {rel['paper']} | {rel['here']} | {holds} |")
    return "\n".join(lines)


def plot_comparison(rows: Sequence[Row], path: Path, title: str = "") -> Optional[Path]:
    """mAP (voc) against test s/img on a log axis: left excluding proposal time (the
    papers' measure), right end to end; SVD variants as a second point joined to their base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    by = {r.key: r for r in rows}
    panels = (("s_excl_proposals", "test s/img, excluding proposals"), ("s_total", "test s/img, end to end"))
    for ax, (attr, xlabel) in zip(axes, panels):
        plotted = False
        for spec in STAGES:
            r = by[spec.key]
            x = getattr(r, attr)
            if not r.ok or x is None or r.mAP_voc is None:
                continue
            colour = f"C{STAGE_KEYS.index(spec.svd_of or spec.key)}"  # a variant in its base's colour
            marker = "D" if spec.svd_of else "o"
            ax.scatter([x], [r.mAP_voc], color=colour, marker=marker, s=55, zorder=3, label=r.label)
            ax.annotate(r.label, (x, r.mAP_voc), textcoords="offset points", xytext=(5, 5), fontsize=8)
            base = by.get(spec.svd_of or "")
            bx = getattr(base, attr) if base is not None else None
            if base is not None and base.ok and bx is not None and base.mAP_voc is not None:
                ax.plot([bx, x], [base.mAP_voc, r.mAP_voc], color=colour, linestyle=":", zorder=2)
            plotted = True
        if plotted:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mAP (VOC area)")
    missing = [r.label for r in rows if not r.ok]
    note = f"not shown: {', '.join(missing)}" if missing else ""
    fig.suptitle(f"{title}\n{note}".strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
