"""tools/choose_recipe.py: candidates from grids and explicit override sets, the runs they
make (validation split, budget, seeds), the winner and whether the seeds settle it, and
reuse of finished runs (a fake trainer: nothing is trained here)."""

import json

import pytest
from choose_recipe import folder_of, parse_args, parse_grid, plan, run, split_values
from parity_runs import SuiteError, load_recipe

BETA = "model.roi_head.smooth_l1_beta"


def test_grid_values_split_at_top_level_commas_and_multiply():
    assert split_values("[320],[384, 400], 1") == ["[320]", "[384, 400]", "1"]
    with pytest.raises(SuiteError):
        split_values("1,,2")
    grid = parse_grid([f"{BETA}=1.0,0.111", "schedule=1,1.5,2"])
    assert len(grid) == 6
    assert grid[0] == [(BETA, "1.0"), ("schedule", "1")] and grid[-1] == [(BETA, "0.111"), ("schedule", "2")]
    # The same last key part with the same value still gives two folders.
    assert folder_of([(BETA, "1")]) != folder_of([("model.proposals.rpn.smooth_l1_beta", "1")])
    assert folder_of([("data.input.min_size_train", "[320]")]).startswith("min_size_train=320-")


def test_runs_train_on_train_score_on_val_with_budget_and_schedule(tmp_path):
    args = parse_args(["--grid", "schedule=0.5,1", "--seeds", "0", "1", "--budget", "0.5", "--out", str(tmp_path)])
    named, specs = plan(args)
    assert len(named) == 2 and len(specs) == 4
    assert [(s.seed, s.group) for s in specs] == [
        (0, named[0][0]),
        (0, named[1][0]),
        (1, named[0][0]),
        (1, named[1][0]),
    ]
    cfgs = [load_recipe(s.config, s.overrides) for s in specs[:2]]
    # schedule 0.5 x budget 0.5 of 450 iterations, warmup 150, step at 360 (112.5 and 37.5
    # rounded half to even, as Python's round); schedule 1 x 0.5.
    assert [(c.train.max_iter, c.train.warmup_iters, c.train.steps) for c in cfgs] == [
        (112, 38, [90]),
        (225, 75, [180]),
    ]
    assert all((c.data.train.split, c.data.test.split) == ("train", "val") for c in cfgs)
    # ceil(112 / 4): four checkpoints per run
    assert specs[0].extra == ["train.checkpoint_period=28"] and {s.framework for s in specs} == {"detkit"}


def test_default_candidates_are_the_box_beta_of_the_paper_and_of_torchvision(tmp_path):
    named, _ = plan(parse_args(["--out", str(tmp_path)]))
    assert [pairs for _, pairs in named] == [[(BETA, "1.0")], [(BETA, "0.1111111111111111")]]
    with pytest.raises(SuiteError, match="at least two"):
        plan(parse_args(["--grid", f"{BETA}=1.0", "--out", str(tmp_path)]))


def values(one, ninth):
    """FakeTrainer figures: VOC mAP per seed of beta 1 and beta 1/9."""
    out = {}
    for pairs, maps in ((((BETA, "1.0"),), one), (((BETA, "0.1111111111111111"),), ninth)):
        for seed, m in enumerate(maps):
            out[(folder_of(list(pairs)), "detkit", seed)] = (m, m - 0.05, 10.0 + seed, 0.4)
    return out


def test_winner_lead_and_whether_the_seeds_settle_it(tmp_path, fake_trainer):
    args = parse_args(["--out", str(tmp_path / "a")])
    lines = []
    assert run(args, fake_trainer(values([0.90, 0.92], [0.88, 0.89])), echo=lines.append) == 0
    md = (tmp_path / "a" / "choice.md").read_text()
    assert (
        f"| `{BETA}=1.0` **winner** | 2 | 0.9100 (0.9000–0.9200) | 0.8600 (0.8500–0.8700) | 10.50 (10.00–11.00) |" in md
    )
    assert f"Lead over `{BETA}=0.1111111111111111`: +0.0250 VOC mAP; larger spread 0.0200: larger" in md
    data = json.loads((tmp_path / "a" / "choice.json").read_text())
    assert data["choice"]["winner_label"] == f"{BETA}=1.0" and data["choice"]["settled"] is True

    args = parse_args(["--out", str(tmp_path / "b")])
    assert run(args, fake_trainer(values([0.90, 0.94], [0.91, 0.92])), echo=lines.append) == 0
    data = json.loads((tmp_path / "b" / "choice.json").read_text())
    assert data["choice"]["winner_label"] == f"{BETA}=1.0"
    assert data["choice"]["lead"] == pytest.approx(0.005) and data["choice"]["settled"] is False
    assert "do not settle it" in (tmp_path / "b" / "choice.md").read_text()

    again = fake_trainer()
    assert run(args, again, echo=lines.append) == 0
    assert again.calls == []  # every run was finished: reused
