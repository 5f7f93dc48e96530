"""The stage runner: a run is a list of stages; finished stages are skipped on resume, the
stage a run was killed in resumes from its own outputs, and model_final.pt holds the model
after the last stage that changed it. A non-SGD "fit" stage (as R-CNN's SVM fitting will be)
plugs in next to the SGD and evaluation stages."""

import json

import pytest
import torch

from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.pipelines import stages_for
from detkit.engine.stages import EvaluationStage, Stage, read_run_state, run_stages
from detkit.engine.trainer import SGDStage
from detkit.schema import DatasetConfig


class FitStage(Stage):
    """A stand-in for an offline fitting stage (SVMs, box regression): it writes a partial
    output, can be killed there, and on success sets the model's weight to a fitted value
    and writes fit.json. It records the weight it started from."""

    name = "fit"
    changes_model = True

    def __init__(self, crash=False):
        self.crash = crash
        self.runs = 0
        self.started_from = []

    def done(self, run):
        return (run.out_dir / "fit.json").is_file()

    def run(self, run):
        self.runs += 1
        self.started_from.append(run.model.w.item())
        partial = run.out_dir / "fit.partial"
        resumed_from = partial.read_text() if run.resume and partial.exists() else None
        partial.write_text("first half of the fit")
        if self.crash:
            raise RuntimeError("killed inside the fit stage")
        with torch.no_grad():
            run.model.w.fill_(42.0)
        (run.out_dir / "fit.json").write_text(json.dumps({"resumed_from": resumed_from}))


def metric(dets, dataset):
    return {"metric": "voc", "mAP": 0.25, "per_class": {"a": 0.25}}


def pipeline(fit):
    return [SGDStage(), fit, EvaluationStage()]


def test_a_fit_stage_runs_between_training_and_evaluation(tmp_path, toy):
    cfg = toy.config(max_iter=2)
    model = toy.ToyDetector()
    fit = FitStage()
    run = toy.make_run(cfg, model, tmp_path, test_set=toy.RandomImages(2), evaluate_fn=metric)
    results = run_stages(pipeline(fit), run)
    assert model.calls == 2 + 2  # two training steps, then two test images (batch size 1)
    assert fit.runs == 1 and fit.started_from[0] != 1.0  # it got the trained weight
    assert read_run_state(tmp_path) == {
        "stages": ["train", "fit", "evaluate"],
        "finished": ["train", "fit", "evaluate"],
        "running": None,
    }
    # model_final.pt is the model after the last stage that changed it, with the SGD stage's
    # training state kept (a later resume can still train further).
    final = load_checkpoint(tmp_path / "model_final.pt")
    assert float(final["model"]["w"]) == 42.0 and final["stage"] == "fit"
    assert final["iteration"] == 2 and "optimizer" in final and final["class_names"] == ["a"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pt\n"
    assert results["evaluation"]["mAP"] == 0.25
    assert json.loads((tmp_path / "eval.json").read_text())["mAP"] == 0.25
    assert "train_minutes" in json.loads((tmp_path / "eval.json").read_text())


def test_resume_of_a_finished_run_skips_every_stage(tmp_path, toy):
    cfg = toy.config(max_iter=2)
    run_stages(
        pipeline(FitStage()),
        toy.make_run(cfg, toy.ToyDetector(), tmp_path, test_set=toy.RandomImages(2), evaluate_fn=metric),
    )
    before = (tmp_path / "model_final.pt").read_bytes()
    model, fit = toy.ToyDetector(), FitStage()
    run = toy.make_run(cfg, model, tmp_path, resume=True, test_set=toy.RandomImages(2), evaluate_fn=metric)
    results = run_stages(pipeline(fit), run)
    assert model.calls == 0 and fit.runs == 0
    assert (tmp_path / "model_final.pt").read_bytes() == before
    assert results["evaluation"]["mAP"] == 0.25  # read back from eval.json


def test_a_run_killed_inside_the_fit_stage_resumes_there(tmp_path, toy):
    cfg = toy.config(max_iter=2)
    trained = toy.ToyDetector()
    run = toy.make_run(cfg, trained, tmp_path, test_set=toy.RandomImages(2), evaluate_fn=metric)
    with pytest.raises(RuntimeError, match="killed inside the fit stage"):
        run_stages(pipeline(FitStage(crash=True)), run)
    assert read_run_state(tmp_path)["finished"] == ["train"]
    assert read_run_state(tmp_path)["running"] == "fit"
    assert not (tmp_path / "eval.json").exists()

    fresh, fit = toy.ToyDetector(), FitStage()
    assert fresh.w.item() == 1.0 != trained.w.item()
    run = toy.make_run(cfg, fresh, tmp_path, resume=True, test_set=toy.RandomImages(2), evaluate_fn=metric)
    run_stages(pipeline(fit), run)
    assert fresh.calls == 2  # no training step again: only the two test images
    # The fit starts from the trained model (restored from model_final.pt), not from a fresh
    # initialisation, and continues from its own partial output.
    assert fit.started_from == [trained.w.item()]
    assert json.loads((tmp_path / "fit.json").read_text()) == {"resumed_from": "first half of the fit"}
    assert read_run_state(tmp_path)["finished"] == ["train", "fit", "evaluate"]
    assert float(load_checkpoint(tmp_path / "model_final.pt")["model"]["w"]) == 42.0


def test_training_further_reruns_the_stages_after_it(tmp_path, toy):
    cfg = toy.config(max_iter=2)
    run_stages(
        pipeline(FitStage()),
        toy.make_run(cfg, toy.ToyDetector(), tmp_path, test_set=toy.RandomImages(2), evaluate_fn=metric),
    )
    cfg.train.max_iter = 3
    model, fit = toy.ToyDetector(), FitStage()
    run = toy.make_run(cfg, model, tmp_path, resume=True, test_set=toy.RandomImages(2), evaluate_fn=metric)
    run_stages(pipeline(fit), run)
    # One more training step from the fitted model (w = 42) and a fresh fit after it: the
    # fit's input changed, so its old output does not count as done.
    assert fit.runs == 1 and fit.started_from[0] != 42.0
    assert load_checkpoint(tmp_path / "model_final.pt")["iteration"] == 3


def test_stages_for_a_faster_rcnn_config(tmp_path):
    from detkit.schema import Config

    cfg = Config()
    assert [s.name for s in stages_for(cfg)] == ["train"]
    cfg.data.test = DatasetConfig(format="voc", root=str(tmp_path))
    assert [(type(s).__name__, s.name) for s in stages_for(cfg)] == [
        ("SGDStage", "train"),
        ("EvaluationStage", "evaluate"),
    ]


def test_stage_names_must_be_unique(tmp_path, toy):
    with pytest.raises(ValueError, match="unique"):
        run_stages([SGDStage(), SGDStage()], toy.make_run(toy.config(max_iter=1), toy.ToyDetector(), tmp_path))
