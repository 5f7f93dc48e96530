"""tools/parity_suite.py: the bookkeeping with a fake trainer (reuse, resume / restart,
refusals, the table from recorded runs, mean / spread and the verdict), the schedule budget,
and one real end-to-end run of both frameworks at a minimal budget."""

import json
import time

import parity_suite
import pytest
from parity_runs import SuiteError, read_run, scaled_schedule, stats
from parity_suite import parse_args, regime_specs, run_suite, verdict

from detkit.schema import TrainConfig

ONE = "shapes_one_class"


def suite(tmp_path, *extra, regimes=(ONE,), seeds=(0, 1)):
    argv = ["--regimes", *regimes, "--seeds", *map(str, seeds), "--budget", "0.01", "--out", str(tmp_path / "runs")]
    return parse_args(argv + list(extra))


def test_finished_runs_are_reused_and_not_trained_again(tmp_path, fake_trainer):
    args = suite(tmp_path)
    first = fake_trainer()
    assert run_suite(args, first, echo=lambda s: None) == 0
    # One at a time, the frameworks alternating within each seed.
    assert first.calls == [
        (ONE, "detkit", 0, "new"),
        (ONE, "detkit", 0, "speed"),
        (ONE, "torchvision", 0, "new"),
        (ONE, "detkit", 1, "new"),
        (ONE, "detkit", 1, "speed"),
        (ONE, "torchvision", 1, "new"),
    ]
    evals = sorted((tmp_path / "runs").rglob("eval.json"))
    assert len(evals) == 6  # 4 runs + the 2 detkit inference passes
    stamps = [p.stat().st_mtime_ns for p in evals]
    time.sleep(0.01)
    second = fake_trainer()
    assert run_suite(args, second, echo=lambda s: None) == 0
    assert second.calls == []
    assert [p.stat().st_mtime_ns for p in evals] == stamps


def test_interrupted_runs_are_resumed_by_detkit_and_restarted_by_torchvision(tmp_path, fake_trainer):
    args = suite(tmp_path)
    lines = []
    crashing = fake_trainer(fail=[(ONE, "detkit", 1), (ONE, "torchvision", 0)])
    assert run_suite(args, crashing, echo=lines.append) == 1
    assert any("failed (exit code 1)" in line for line in lines)
    assert lines[-1].startswith("2 run(s) failed")
    report = json.loads((tmp_path / "runs" / "parity.json").read_text())
    assert report["regimes"][ONE]["detkit"]["runs"] == 1 and report["regimes"][ONE]["torchvision"]["runs"] == 1
    assert report["failed"] == [f"{ONE} torchvision seed 0: (no log)", f"{ONE} detkit seed 1: (no log)"]
    assert "Failed runs (left out of the table" in (tmp_path / "runs" / "parity.md").read_text()

    again = fake_trainer()
    assert run_suite(args, again, echo=lambda s: None) == 0
    assert again.calls == [
        (ONE, "torchvision", 0, "restart"),
        (ONE, "detkit", 1, "resume"),
        (ONE, "detkit", 1, "speed"),
    ]
    launches = json.loads((tmp_path / "runs" / ONE / "detkit_seed1" / "parity_run.json").read_text())["launches"]
    assert [(x["mode"], x["rc"]) for x in launches] == [("new", 1), ("resume", 0)]
    # The resumed run's session timed only itself (0.1 min); its whole schedule is the sum of
    # the logged s/iter: 2 iterations at 9 s before the crash, 2 at 3 s after -> 24 s.
    res = read_run(tmp_path / "runs" / ONE / "detkit_seed1", 1)
    assert res.resumed and res.train_minutes == pytest.approx(24 / 60)
    assert not read_run(tmp_path / "runs" / ONE / "torchvision_seed0", 0).resumed
    md = (tmp_path / "runs" / "parity.md").read_text()
    assert "†: a run was resumed" in md and "Failed runs" not in md


def test_a_folder_with_another_recipe_is_refused(tmp_path, fake_trainer, capsys):
    assert run_suite(suite(tmp_path, seeds=[0]), fake_trainer(), echo=lambda s: None) == 0
    changed = suite(tmp_path, "--set", "model.roi_head.batch_size_per_image=64", seeds=[0])
    with pytest.raises(SuiteError, match=r"another recipe \(model\.roi_head\.batch_size_per_image: 128 -> 64\)"):
        run_suite(changed, fake_trainer(), echo=lambda s: None)
    # Through main: one line, exit code 2, the finished run untouched.
    argv = ["--regimes", ONE, "--seeds", "0", "--budget", "0.01", "--out", str(tmp_path / "runs")]
    assert parity_suite.main(argv + ["--set", "model.roi_head.batch_size_per_image=64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size_per_image" in err[0]
    assert (tmp_path / "runs" / ONE / "detkit_seed0" / "eval.json").is_file()


def test_a_run_the_suite_did_not_start_is_refused(tmp_path, fake_trainer):
    foreign = tmp_path / "runs" / ONE / "detkit_seed0"
    foreign.mkdir(parents=True)
    (foreign / "eval.json").write_text("{}")
    with pytest.raises(SuiteError, match="did not start"):
        run_suite(suite(tmp_path, seeds=[0]), fake_trainer(), echo=lambda s: None)
    assert (foreign / "eval.json").read_text() == "{}"


VALUES = {
    # (voc, voc07, training minutes, s/img)
    (ONE, "detkit", 0): (0.80, 0.75, 2.0, 0.02),
    (ONE, "detkit", 1): (0.84, 0.79, 3.0, 0.04),
    (ONE, "torchvision", 0): (0.86, 0.80, 4.0, 0.05),
    (ONE, "torchvision", 1): (0.85, 0.82, 6.0, 0.07),
    ("shapes_large", "detkit", 0): (0.70, 0.60, 1.0, 0.01),
    ("shapes_large", "detkit", 1): (0.72, 0.62, 1.0, 0.01),
    ("shapes_large", "torchvision", 0): (0.80, 0.70, 2.0, 0.02),
    ("shapes_large", "torchvision", 1): (0.81, 0.74, 2.0, 0.02),
}


def test_table_from_recorded_runs(tmp_path, fake_trainer):
    args = suite(tmp_path, regimes=(ONE, "shapes_large"))
    assert run_suite(args, fake_trainer(VALUES), echo=lambda s: None) == 0
    (tmp_path / "runs" / "parity.md").unlink()
    report_only = suite(tmp_path, "--report-only", regimes=(ONE, "shapes_large"))
    nothing = fake_trainer()
    assert run_suite(report_only, nothing, echo=lambda s: None) == 0
    assert nothing.calls == []
    rows = [line for line in (tmp_path / "runs" / "parity.md").read_text().splitlines() if line.startswith("| shapes")]
    assert rows == [
        "| shapes_one_class | detkit | 2 | 4 | 0.8200 (0.8000–0.8400) | 0.7700 (0.7500–0.7900) "
        "| 2.50 (2.00–3.00) | 0.030 (0.020–0.040) |",
        "| shapes_one_class | torchvision | 2 | 4 | 0.8550 (0.8500–0.8600) | 0.8100 (0.8000–0.8200) "
        "| 5.00 (4.00–6.00) | 0.060 (0.050–0.070) |",
        "| shapes_large | detkit | 2 | 4 | 0.7100 (0.7000–0.7200) | 0.6100 (0.6000–0.6200) "
        "| 1.00 (1.00–1.00) | 0.010 (0.010–0.010) |",
        "| shapes_large | torchvision | 2 | 4 | 0.8050 (0.8000–0.8100) | 0.7200 (0.7000–0.7400) "
        "| 2.00 (2.00–2.00) | 0.020 (0.020–0.020) |",
        # -0.035 is within the larger spread 0.04; -0.095 is not (spread 0.02).
        "| shapes_one_class | -0.0350 | 0.0400 | yes | 0.50 | 0.50 |",
        "| shapes_large | -0.0950 | 0.0200 | **no** | 0.50 | 0.50 |",
    ]
    data = json.loads((tmp_path / "runs" / "parity.json").read_text())
    one = data["regimes"][ONE]
    assert one["detkit"]["mAP"] == pytest.approx({"n": 2, "mean": 0.82, "min": 0.80, "max": 0.84, "spread": 0.04})
    assert one["verdict"]["on_par"] is True and data["regimes"]["shapes_large"]["verdict"]["on_par"] is False
    assert one["verdict"]["train_time_ratio"] == pytest.approx(0.5)
    assert one["config"] == "configs/parity/shapes_one_class.yaml"
    assert data["spread"] == "max - min over seeds" and data["budget"] == 0.01


def test_report_names_the_overrides_and_what_torchvision_cannot_follow(tmp_path, fake_trainer):
    plain = suite(tmp_path, regimes=(ONE,))
    assert run_suite(plain, fake_trainer(VALUES), echo=lambda s: None) == 0
    text = (tmp_path / "runs" / "parity.md").read_text()
    assert "(--set)" not in text
    assert "- Every regime: torchvision cannot follow the box predictor init: detkit gaussian" in text
    assert "- Every regime: torchvision cannot follow the P6 anchor stride" in text
    sets = ["model.roi_head.predictor_init=pytorch", "model.anchors.strides_from_input=true"]
    following = suite(tmp_path, "--out", str(tmp_path / "following"), "--set", *sets, regimes=(ONE,))
    assert run_suite(following, fake_trainer(VALUES), echo=lambda s: None) == 0
    text = (tmp_path / "following" / "parity.md").read_text()
    assert f"Every run with `{' '.join(sets)}` (--set)." in text
    assert "cannot follow" not in text  # nothing left that torchvision does otherwise


def test_mean_spread_and_verdict_arithmetic():
    s = stats([0.25, None, 0.75])
    assert s == {"n": 2, "mean": 0.5, "min": 0.25, "max": 0.75, "spread": 0.5}
    assert stats([None]) is None
    tv = {"mAP": stats([0.75, 0.75]), "train_minutes": stats([4.0]), "s_per_img": stats([0.5])}
    # detkit 0.5 with spread 0.5: exactly torchvision's 0.75 minus the larger spread -> on par.
    at = verdict({"mAP": stats([0.25, 0.75]), "train_minutes": stats([3.0]), "s_per_img": stats([0.25])}, tv)
    assert at["on_par"] and at["larger_spread"] == 0.5 and at["delta_mAP"] == -0.25
    assert at["train_time_ratio"] == 0.75 and at["s_per_img_ratio"] == 0.5
    below = verdict({"mAP": stats([0.25, 0.5])}, tv)  # 0.375 < 0.75 - 0.25
    assert not below["on_par"] and below["larger_spread"] == 0.25
    assert verdict({"mAP": None}, tv) is None


def test_budget_scales_each_recipe_and_bccd_uses_the_validation_split():
    specs = regime_specs("bccd_val", ["detkit", "torchvision"], [0, 1], 0.25, ["train.num_threads=1"])
    assert [(s.framework, s.seed) for s in specs] == [
        ("detkit", 0),
        ("torchvision", 0),
        ("detkit", 1),
        ("torchvision", 1),
    ]
    dk, tv = specs[0], specs[1]
    assert (
        dk.overrides
        == tv.overrides
        == [
            "train.num_threads=1",
            "train.max_iter=112",  # 0.25 x the recipe's 450 (112.5 rounded half to even)
            "train.warmup_iters=38",  # 0.25 x 150
            "train.steps=[90]",  # 0.25 x 360
            "train.seed=0",
        ]
    )
    assert dk.extra == ["train.checkpoint_period=28"] and tv.extra == []  # ceil(112 / 4)
    cfg = parity_suite.load_recipe(dk.config, dk.overrides)
    assert (cfg.data.train.split, cfg.data.test.split) == ("train", "val")
    assert cfg.train.max_iter == 112 and cfg.train.steps == [90] and cfg.model.roi_head.smooth_l1_beta == 1.0
    tiny = TrainConfig(max_iter=600, warmup_iters=50, steps=[480])
    assert scaled_schedule(tiny, 0.001) == ["train.max_iter=1", "train.warmup_iters=0", "train.steps=[1]"]
    assert scaled_schedule(tiny, 1) == []
    with pytest.raises(SuiteError):
        scaled_schedule(tiny, 0)


def test_dry_run_shows_what_is_reused_and_estimates_from_measured_runs(tmp_path, fake_trainer):
    assert run_suite(suite(tmp_path, seeds=[0]), fake_trainer(), echo=lambda s: None) == 0
    lines = []
    launcher = fake_trainer()
    assert run_suite(suite(tmp_path, "--dry-run", seeds=[0, 1]), launcher, echo=lines.append) == 0
    assert launcher.calls == []
    assert "reuse (finished)" in lines[0] and "reuse (finished)" in lines[1]
    # The fake runs logged 15 s/iter: 6 iterations x 15 s, and twice (training's evaluation,
    # the inference pass) 15 s start + 100 test images x 0.03 s: 126 s = 2.1 min.
    assert "train" in lines[2] and "    6 iterations  ~  2.1 min" in lines[2]
    assert lines[-1].startswith("4 runs; estimated time")
    assert not (tmp_path / "runs" / ONE / "detkit_seed1").exists()


def test_end_to_end_both_frameworks_at_a_minimal_budget(tmp_path):
    """Real trainings (subprocesses): the smallest regime, 2 seeds x 2 frameworks, 4
    iterations on 8 tiny images, and detkit's inference passes; about 25 s on 2 idle CPU
    cores (six processes that each import torch), a minute on a loaded machine."""
    shapes = ["num_train=8", "num_test=4", "image_size=[64,80]", "object_size=[12,32]"]
    sets = [f"data.{split}.root={tmp_path / 'shapes'}" for split in ("train", "test")]
    sets += [f"data.{split}.shapes.{kv}" for split in ("train", "test") for kv in shapes]
    sets += ["data.input.min_size_train=[64]", "data.input.max_size=96", "data.input.min_size_test=64"]
    sets += ["data.batch_size=2", "train.num_threads=1", "train.log_period=2"]
    args = suite(tmp_path, "--budget", "0.007", "--set", *sets)
    assert run_suite(args, echo=lambda s: None) == 0
    data = json.loads((tmp_path / "runs" / "parity.json").read_text())
    entry = data["regimes"][ONE]
    rows = [line for line in (tmp_path / "runs" / "parity.md").read_text().splitlines() if line.startswith(f"| {ONE}")]
    assert len(rows) == 3  # detkit, torchvision, the verdict
    for fw in ("detkit", "torchvision"):
        assert entry[fw]["runs"] == 2 and entry[fw]["seeds"] == [0, 1]
        for seed in (0, 1):
            run = tmp_path / "runs" / ONE / f"{fw}_seed{seed}"
            result = json.loads((run / "eval.json").read_text())
            detail = next(r for r in entry[fw]["runs_detail"] if r["seed"] == seed)
            assert detail["mAP"] == result["mAP"] and detail["voc07"] == result["extra"]["voc07"]["mAP"]
            assert detail["iterations"] == 4 and detail["train_minutes"] > 0
            if fw == "detkit":  # plain inference timed by detkit eval: the same detections
                speed = json.loads((run / "speed" / "eval.json").read_text())
                assert speed["mAP"] == result["mAP"] and detail["s_per_img"] == speed["s_per_img"]
            else:
                assert detail["s_per_img"] == result["s_per_img"]
            assert "train.max_iter=4" in (run / "suite.log").read_text()
        assert f"| {ONE} | {fw} | 2 | 4 |" in "\n".join(rows)
    assert entry["verdict"] is not None and isinstance(entry["verdict"]["on_par"], bool)
    tv = json.loads((tmp_path / "runs" / ONE / "torchvision_seed0" / "eval.json").read_text())
    assert any("P6 anchor stride" in d for d in tv["torchvision_deviations"])
    assert not any("beta" in d for d in tv["torchvision_deviations"])


def test_recipe_diff_names_changed_values_and_ignores_schema_additions():
    from parity_runs import diff_recipes

    old = {"model": {"roi_head": {"smooth_l1_beta": 1.0, "fc_dims": [256, 256]}}, "train": {"seed": 0}}
    new = {"model": {"roi_head": {"smooth_l1_beta": 0.5, "fc_dims": [256, 256], "name": "fast_rcnn"}}, "train": {}}
    assert diff_recipes(old, new) == ["model.roi_head.smooth_l1_beta: 1.0 -> 0.5"]
    assert diff_recipes(old, old) == []
