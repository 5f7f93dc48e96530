"""A training run is a list of stages, run in order in one run folder.

    stages = stages_for(cfg)                 # detkit.engine.pipelines
    run = RunContext(cfg, model, train_set, test_set, out_dir, class_names, resume=...)
    results = run_stages(stages, run)        # results["evaluation"]: the final evaluation

A stage is one step of training or testing: SGD training of the network
(``detkit.engine.trainer.SGDStage``), evaluation (``EvaluationStage``), and for R-CNN's
classic pipeline feature extraction to a cache, fitting SVMs and fitting box regression. A
stage has a ``name``, says whether its outputs in the run folder show it ``done``, and
``run``s; a stage that changes the model's weights sets ``changes_model``. Each stage is
resumable from its own outputs: the SGD stage from its last checkpoint, an offline stage
from the chunks it has written.

The runner records progress in ``run_state.json`` (written atomically): the stage list,
the stages finished in order, and the stage running. With ``resume`` it skips the leading
stages that are recorded finished *and* whose outputs say ``done`` (a stage after one that
runs again runs again too, since its input changed), restores the model from
``model_final.pt`` when a skipped stage had changed it, and runs the stage it was in (which
resumes from its outputs) and the ones after it.

``model_final.pt`` always holds the model after the last stage that changed it: the SGD
stage writes it with its optimizer state; after any other stage that changes the model the
runner writes it (keeping the SGD stage's training state), so ``detkit eval`` and
``detkit demo`` find everything the finished pipeline needs in that one file (an R-CNN head
keeps its SVM and box-regression weights as module buffers for this reason).

Distributed runs (torchrun, ``detkit.engine.distributed``): every rank runs every stage;
rank 0 alone decides from the run folder what is done and alone writes into it (run_state,
model_final.pt, metrics, eval files); the evaluation is sharded across the ranks and scored
on rank 0. A stage with per-image work shards it the same way (see that module's doc).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from detkit.config import to_dict
from detkit.engine import distributed
from detkit.engine.checkpoint import (
    FINAL_NAME,
    atomic_write_text,
    load_checkpoint,
    load_model_state,
    save_run_checkpoint,
)
from detkit.engine.evaluate import evaluate_detections, write_evaluation
from detkit.engine.inference import amp_dtype, denormals_flushed, device_from_config, run_inference
from detkit.engine.metrics import MetricsLog, detection_images
from detkit.errors import CheckpointError, TrainingError
from detkit.schema import Config

logger = logging.getLogger("detkit")

RUN_STATE = "run_state.json"
# The entries of model_final.pt that describe the model itself; the others (iteration,
# optimizer, scheduler, scaler, rng) are the SGD stage's training state.
_MODEL_ENTRIES = ("model", "config", "class_names", "stage", "format")
# How many test images TensorBoard shows with their detections at each evaluation.
TENSORBOARD_IMAGES = 4


class _SilentMetricsLog(MetricsLog):
    """The MetricsLog of ranks other than 0 in a distributed run: writes nothing."""

    def log(self, record) -> None:
        return None

    def trim(self, last_iter: int) -> None:
        return None

    def add_images(self, tag, images, step) -> None:
        return None


@dataclass
class RunContext:
    """Everything a stage works with. ``results`` carries what a stage hands on (the SGD
    stage's ``train_minutes``, the evaluation's result as ``evaluation``); ``metrics`` writes
    metrics.jsonl (and TensorBoard). ``evaluate_fn(dets, dataset) -> result`` defaults to
    the config's metrics (``detkit.engine.evaluate.evaluate_detections``)."""

    cfg: Config
    model: nn.Module
    train_set: Any
    test_set: Any
    out_dir: Path
    class_names: List[str]
    device: Optional[torch.device] = None
    resume: bool = False
    progress: bool = True
    evaluate_fn: Optional[Callable[[Dict, Any], Dict]] = None
    results: Dict[str, Any] = field(default_factory=dict)
    metrics: MetricsLog = field(init=False)
    final_saved_by: Optional[str] = field(default=None, init=False)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.class_names = list(self.class_names)
        if self.device is None:
            self.device = device_from_config(self.cfg.train.device)
        # Only rank 0 of a distributed run logs (the others' MetricsLog writes nothing).
        metrics_class = MetricsLog if distributed.is_main() else _SilentMetricsLog
        self.metrics = metrics_class(self.out_dir, tensorboard=self.cfg.train.tensorboard)

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype of mixed precision (``train.amp`` / ``train.amp_dtype``), or None."""
        assert self.device is not None
        return amp_dtype(self.device, self.cfg.train.amp, self.cfg.train.amp_dtype)

    @property
    def use_amp(self) -> bool:
        """Mixed precision: on CUDA when the config asks for it (on the CPU with amp_dtype bf16)."""
        return self.amp_dtype is not None

    def evaluate(self, dets: Dict, dataset) -> Dict:
        if self.evaluate_fn is not None:
            return self.evaluate_fn(dets, dataset)
        return evaluate_detections(self.cfg.test, dets, dataset)

    def save_final(self, stage: str, training_state: Optional[Dict] = None) -> Path:
        """model_final.pt := the model now, config, class names, the stage that wrote it and
        the SGD stage's training state (``training_state``, or else the one already in
        model_final.pt). Written by rank 0 only."""
        path = self.out_dir / FINAL_NAME
        self.final_saved_by = stage
        if not distributed.is_main():
            return path
        if training_state is None:
            old = load_checkpoint(path) if path.is_file() else {}
            training_state = {k: v for k, v in old.items() if k not in _MODEL_ENTRIES}
        state = {
            **training_state,
            "model": self.model.state_dict(),
            "config": to_dict(self.cfg),
            "class_names": self.class_names,
            "stage": stage,
        }
        save_run_checkpoint(path, state)
        return path

    def load_final(self) -> None:
        """Load the model state of model_final.pt (the state after the last finished stage
        that changed the model); rank 0 reads it and hands it to the other ranks."""
        path = self.out_dir / FINAL_NAME

        def read() -> Dict:
            if not path.is_file():
                raise CheckpointError(
                    f"{path} is missing, but {RUN_STATE} records stages that changed the model as finished; "
                    "restore the file or start the run again in another folder"
                )
            return load_checkpoint(path)["model"]

        load_model_state(self.model, distributed.on_main(read, f"reading {path}"), str(path))


class Stage(ABC):
    """One step of a run (see the module doc)."""

    name: str = "stage"
    #: True when ``run`` changes the model's weights; the runner then saves model_final.pt.
    changes_model: bool = False

    @abstractmethod
    def done(self, run: RunContext) -> bool:
        """Whether this stage's outputs in ``run.out_dir`` are complete for ``run.cfg``."""

    @abstractmethod
    def run(self, run: RunContext) -> None:
        """Do the work; with ``run.resume``, continue from this stage's partial outputs."""

    def skip(self, run: RunContext) -> None:
        """Called instead of ``run`` when the stage is done: load what later stages or the
        caller need from its outputs (nothing by default)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def read_run_state(out_dir) -> Dict:
    """run_state.json as a dict ({} when absent or unreadable: then nothing is skipped)."""
    path = Path(out_dir) / RUN_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_run_state(out_dir, stages: Sequence[str], finished: Sequence[str], running: Optional[str]) -> None:
    state = {"stages": list(stages), "finished": list(finished), "running": running}
    atomic_write_text(Path(out_dir) / RUN_STATE, json.dumps(state, indent=1) + "\n")


def run_stages(stages: Sequence[Stage], run: RunContext) -> Dict[str, Any]:
    """Run ``stages`` in order in ``run.out_dir`` (see the module doc) -> ``run.results``."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")

    def done_stages() -> int:  # from the run folder: rank 0 decides for every rank
        finished = read_run_state(run.out_dir).get("finished", []) if run.resume else []
        skip = 0
        while skip < len(stages) and skip < len(finished) and finished[skip] == names[skip] and stages[skip].done(run):
            skip += 1
        run.out_dir.mkdir(parents=True, exist_ok=True)
        return skip

    skip = distributed.on_main(done_stages, "reading run_state.json")
    main = distributed.is_main()
    try:
        with denormals_flushed(run.cfg.train.flush_denormal):
            if skip < len(stages) and any(s.changes_model for s in stages[:skip]):
                run.load_final()
            for stage in stages[:skip]:
                logger.info("stage %s: done, skipped (resume)", stage.name)
                stage.skip(run)
            for i in range(skip, len(stages)):
                stage = stages[i]
                if main:
                    write_run_state(run.out_dir, names, names[:i], running=stage.name)
                if len(stages) > 1:
                    logger.info("stage %d/%d: %s", i + 1, len(stages), stage.name)
                run.final_saved_by = None
                stage.run(run)
                if stage.changes_model and run.final_saved_by != stage.name:
                    run.save_final(stage.name)
                if main:
                    write_run_state(run.out_dir, names, names[: i + 1], running=None)
    finally:
        run.metrics.close()
    return run.results


# -- evaluation -------------------------------------------------------------------------------
def evaluate_on_test_set(run: RunContext, iteration: int) -> Optional[Dict]:
    """Detections, validation losses and the metric on ``run.test_set``; logs the
    evaluation record (and TensorBoard images). -> result with ``s_per_img`` and ``dets``,
    or None without a test set. In a distributed run every rank calls it and runs its share
    of the images; rank 0 scores them and gets the result, the others None."""
    if run.test_set is None:
        return None
    assert run.device is not None
    # Evaluation (validation-loss sampling, a metric's own draws) must not move the training
    # RNG: a run with eval_period and a resumed run then see the random stream of a plain run.
    distributed.sync_buffers(run.model)  # every rank evaluates the model rank 0 saves
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        dets, val_losses, sec_per_img = run_inference(
            run.model,
            run.test_set,
            run.cfg.data.test_batch_size,
            run.device,
            run.cfg.data.num_workers,
            compute_losses=True,
            amp=run.amp_dtype,
            progress=run.progress,
            sharded=True,
        )
        if not distributed.is_main():
            return None
        result = run.evaluate(dets, run.test_set)
    record = {
        "iter": iteration,
        "eval_metric": result["metric"],
        "eval_mAP": result["mAP"],
        "eval_s_per_img": sec_per_img,
    }
    record.update({f"val_{k}": v for k, v in val_losses.items()})
    if val_losses:
        record["val_loss"] = sum(val_losses.values())
    run.metrics.log(record)
    if run.metrics.tensorboard:
        images = detection_images(run.test_set, dets, run.class_names, TENSORBOARD_IMAGES)
        run.metrics.add_images("detections", images, iteration)
    result["s_per_img"] = sec_per_img
    result["dets"] = dets
    return result


class EvaluationStage(Stage):
    """The final evaluation on the test set: eval.json and detections.json in the run
    folder, the evaluation record in metrics.jsonl; ``results["evaluation"]``."""

    name = "evaluate"

    def done(self, run: RunContext) -> bool:
        return (run.out_dir / "eval.json").is_file()

    def run(self, run: RunContext) -> None:
        if run.test_set is None:
            raise TrainingError("the evaluation stage needs a test set (data.test)")
        result = evaluate_on_test_set(run, run.cfg.train.max_iter)
        if result is None:  # a rank other than 0: its share is scored and written on rank 0
            return
        if "train_minutes" in run.results:
            result["train_minutes"] = run.results["train_minutes"]
        write_evaluation(result, result.get("dets"), run.test_set, run.out_dir)
        run.results["evaluation"] = result

    def skip(self, run: RunContext) -> None:
        if distributed.is_main():
            run.results["evaluation"] = json.loads((run.out_dir / "eval.json").read_text(encoding="utf-8"))
