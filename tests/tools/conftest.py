"""Shared pieces of the tools tests: tools/ on the import path (the scripts import each other
as plain modules) and a fake trainer that writes a run folder without training."""

import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


class FakeTrainer:
    """A launcher for ``parity_runs.Runner``: writes what a trainer leaves in a run folder
    (config.yaml, metrics.jsonl with a train_minutes record, eval.json; for detkit's
    inference pass speed/eval.json, and 1 s more per image in eval.json) with figures from
    ``values[(group, framework, seed)] = (voc, voc07, train_minutes, s_per_img)``, and
    records every call. ``fail`` lists (group, framework, seed) that crash half-way once:
    they leave metrics.jsonl behind, no eval.json, and exit with 1."""

    def __init__(self, values=None, fail=()):
        self.values = values or {}
        self.fail = set(fail)
        self.calls = []

    def __call__(self, spec, run_dir, mode):
        key = (spec.group, spec.framework, spec.seed)
        self.calls.append((*key, mode))
        voc, voc07, minutes, s_img = self.values.get(key, (0.5, 0.45, 1.0, 0.01))
        if mode == "speed":  # detkit eval of the finished run: plain inference
            (run_dir / "speed").mkdir()
            (run_dir / "speed" / "eval.json").write_text(json.dumps({"metric": "voc", "mAP": voc, "s_per_img": s_img}))
            return 0
        if spec.framework == "detkit":
            s_img += 1.0  # the evaluation stage's time, validation losses included: not the one reported
        (run_dir / "config.yaml").write_text("fake: true\n")
        if key in self.fail:
            self.fail.discard(key)
            (run_dir / "metrics.jsonl").write_text(json.dumps({"iter": 2, "s_per_iter": 9.0}) + "\n")
            return 1
        records = [{"iter": 4, "s_per_iter": minutes * 60 / 4}, {"iter": 4, "train_minutes": minutes}]
        if mode == "resume":
            # detkit keeps the records up to its checkpoint, trains the rest and times only
            # this session: 2 more iterations at 3 s.
            kept = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
            minutes = 0.1
            records = [r for r in kept if r["iter"] <= 2] + [
                {"iter": 4, "s_per_iter": 3.0},
                {"iter": 4, "train_minutes": minutes},
            ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        result = {
            "metric": "voc",
            "mAP": voc,
            "per_class": {},
            "extra": {"voc07": {"mAP": voc07, "per_class": {}}},
            "s_per_img": s_img,
            "train_minutes": minutes,
        }
        (run_dir / "eval.json").write_text(json.dumps(result))
        return 0


@pytest.fixture
def fake_trainer():
    return FakeTrainer
