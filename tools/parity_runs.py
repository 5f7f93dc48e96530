"""Bookkeeping of many training runs for tools/parity_suite.py and tools/choose_recipe.py:
run folders that are reused when finished and resumed when interrupted, results read back
from them, and mean / spread tables.

A run is a ``RunSpec``: a group (a regime, or a candidate recipe), a framework (``detkit``:
``python -m detkit train``; ``torchvision``: ``tools/train_torchvision.py``), a seed, a
config and its overrides. It lives in ``OUT/<group>/<framework>_seed<seed>/``, beside the
trainer's own files:

    parity_run.json  the resolved recipe the run was started with, and every launch
                     (time, mode new / resume / restart, exit code, load average)
    suite.log        the trainer's output
    speed/eval.json  detkit only: ``detkit eval`` of model_final.pt (see below)

State of a folder: absent or without trainer files -> trained; ``eval.json`` present ->
finished, reused (never trained again); otherwise interrupted -> detkit resumes it
(``detkit train --resume``: from its last checkpoint, finished stages skipped), torchvision
starts it again (``--restart``; it has no checkpoints). A folder whose ``parity_run.json``
holds another recipe, or a folder with a run this bookkeeping did not start, is refused
with one line naming it: nothing is overwritten.

Test speed. detkit's evaluation stage also computes the validation losses (RPN and head
losses on sampled anchors and regions: ~40 % more time per image, measured once on the tiny
shapes recipe); torchvision's script times plain inference. So a finished detkit run gets
one more pass, ``detkit eval`` (plain inference, what a user's evaluation costs) into
``speed/``, and its seconds per image are the ones reported (its mAP is the training
run's; both are equal).
``detkit eval`` sets no thread count of its own: the pass runs with OMP_NUM_THREADS set to
the recipe's ``train.num_threads``.

Statistics over seeds: mean, min, max and spread = max - min (the full range; with two seeds
the distance between them).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from detkit.errors import DetkitError  # noqa: E402

FRAMEWORKS = ("detkit", "torchvision")
SPEC_FILE = "parity_run.json"
LOG_FILE = "suite.log"
# Files that mark a folder as holding a trainer's run (detkit's RUN_FILES and checkpoints).
TRAINER_FILES = ("config.yaml", "metrics.jsonl", "model_final.pt", "eval.json", "run_state.json", "last_checkpoint")


class SuiteError(DetkitError):
    """A run folder or option the suite cannot use (one line, naming it)."""


@dataclass
class RunSpec:
    """One training run. ``overrides`` are the recipe (the same for both frameworks:
    data splits, schedule scaled by the budget, seed, the user's ``--set``); ``extra`` are
    framework-only settings that do not change what is learned (detkit's checkpoint period,
    which makes it resumable)."""

    group: str
    framework: str
    seed: int
    config: str
    overrides: List[str] = field(default_factory=list)
    extra: List[str] = field(default_factory=list)

    def __post_init__(self):
        if self.framework not in FRAMEWORKS:
            raise SuiteError(f"unknown framework {self.framework!r} (use {', '.join(FRAMEWORKS)})")

    @property
    def name(self) -> str:
        return f"{self.framework}_seed{self.seed}"

    def run_dir(self, out: Path) -> Path:
        return Path(out) / self.group / self.name


# -- recipes ---------------------------------------------------------------------------------
def load_recipe(config: str, overrides: Sequence[str]):
    """The validated Config of ``config`` with ``overrides`` (detkit's loader)."""
    from detkit.schema import load_run_config

    return load_run_config(config, list(overrides))


def recipe_dict(config: str, overrides: Sequence[str]) -> Dict[str, Any]:
    from detkit.config import to_dict

    return to_dict(load_recipe(config, overrides))


def scaled_schedule(train_cfg, factor: float) -> List[str]:
    """Overrides that scale a schedule by ``factor``: max_iter, warmup_iters and the lr steps
    (each rounded, at least 1 iteration; warmup at least 0). factor 1 -> []."""
    if not factor > 0 or not math.isfinite(factor):
        raise SuiteError(f"the schedule factor (--budget) must be a positive number, got {factor}")
    if factor == 1:
        return []
    max_iter = max(1, round(train_cfg.max_iter * factor))
    out = [f"train.max_iter={max_iter}", f"train.warmup_iters={max(0, round(train_cfg.warmup_iters * factor))}"]
    if train_cfg.steps:
        steps = [max(1, round(s * factor)) for s in train_cfg.steps]
        out.append(f"train.steps=[{', '.join(str(s) for s in steps)}]")
    return out


def diff_recipes(old: Any, new: Any, prefix: str = "") -> List[str]:
    """'key: old -> new' for every leaf that differs between two recipe dicts. A key that
    only one of them has is a schema change between detkit versions (a new option, whose
    default keeps the old behaviour), not a recipe change: it is not counted."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in old:
            if k in new:
                out += diff_recipes(old[k], new[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


# -- launching -------------------------------------------------------------------------------
Launcher = Callable[[RunSpec, Path, str], int]


SPEED_DIR = "speed"


def command(spec: RunSpec, run_dir: Path, mode: str) -> List[str]:
    """The command line of a run; ``mode``: new, resume (detkit) or restart (torchvision),
    speed (detkit: the inference pass of a finished run)."""
    if mode == "speed":
        cmd = [sys.executable, "-m", "detkit", "eval", spec.config, "--checkpoint", str(run_dir / "model_final.pt")]
        return cmd + ["--out", str(run_dir / SPEED_DIR), "--no-progress"] + list(spec.overrides)
    if spec.framework == "detkit":
        cmd = [sys.executable, "-m", "detkit", "train", spec.config, "--out", str(run_dir), "--no-progress"]
        if mode == "resume":
            cmd.append("--resume")
    else:
        cmd = [sys.executable, str(ROOT / "tools" / "train_torchvision.py"), spec.config, "--out", str(run_dir)]
        cmd.append("--no-progress")
        if mode == "restart":
            cmd.append("--restart")
    return cmd + list(spec.overrides) + list(spec.extra)


def launch_subprocess(spec: RunSpec, run_dir: Path, mode: str) -> int:
    """Run the trainer in a child process (the repository on PYTHONPATH), its output
    appended to ``run_dir/suite.log``; -> exit code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if mode == "speed":
        threads = load_recipe(spec.config, spec.overrides).train.num_threads
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
    cmd = command(spec, run_dir, mode)
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env).returncode


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """One suite at a time per output folder (two trainings at once would also distort each
    other's time columns)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SuiteError(f"another suite is already running in {out} (wait for it, or use another --out)") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# -- results ---------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What a finished run measured. ``train_minutes``: the trainer's wall time of the
    training loop; for a detkit run that was resumed, the sum of its logged seconds per
    iteration over the whole schedule (``resumed`` True), since each session times only
    itself."""

    seed: int
    dir: str
    mAP: Optional[float]
    voc07: Optional[float]
    train_minutes: Optional[float]
    s_per_img: Optional[float]
    iterations: Optional[int]
    resumed: bool = False
    s_per_img_from: str = "eval.json"


def read_jsonl(path: Path) -> List[Dict]:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by an interruption
    return records


def logged_minutes(records: Sequence[Dict]) -> Optional[float]:
    """Sum of s_per_iter x iterations over the training records (each covers the
    iterations since the previous record)."""
    total, prev, seen = 0.0, 0, False
    for r in records:
        if "s_per_iter" in r and "iter" in r:
            total += float(r["s_per_iter"]) * max(int(r["iter"]) - prev, 0)
            prev, seen = int(r["iter"]), True
    return total / 60 if seen else None


def metric_values(result: Dict) -> tuple:
    """(VOC area mAP, VOC07 mAP) from an eval.json (main metric or extra)."""
    values = {result.get("metric"): result.get("mAP")}
    for name, r in (result.get("extra") or {}).items():
        values[name] = r.get("mAP")
    return values.get("voc"), values.get("voc07")


def read_spec_file(run_dir: Path) -> Dict:
    path = run_dir / SPEC_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SuiteError(f"{path}: not valid JSON ({exc}); remove the folder to train this run again") from None
    return data if isinstance(data, dict) else {}


def read_run(run_dir: Path, seed: int) -> RunResult:
    """A finished run's figures from eval.json, metrics.jsonl and parity_run.json."""
    result = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    records = read_jsonl(run_dir / "metrics.jsonl")
    launches = read_spec_file(run_dir).get("launches", [])
    resumed = any(launch.get("mode") == "resume" for launch in launches)
    minutes = None
    if not resumed:
        minutes = result.get("train_minutes")
        if minutes is None:
            recorded = [r["train_minutes"] for r in records if "train_minutes" in r]
            minutes = recorded[-1] if recorded else None
    if minutes is None:
        minutes = logged_minutes(records)
    iters = [int(r["iter"]) for r in records if "s_per_iter" in r and "iter" in r]
    voc, voc07 = metric_values(result)
    s_per_img, source = result.get("s_per_img"), "eval.json"
    speed = run_dir / SPEED_DIR / "eval.json"
    if speed.is_file():
        s_per_img, source = json.loads(speed.read_text(encoding="utf-8")).get("s_per_img"), f"{SPEED_DIR}/eval.json"
    return RunResult(
        seed=seed,
        dir=str(run_dir),
        mAP=voc,
        voc07=voc07,
        train_minutes=minutes,
        s_per_img=s_per_img,
        iterations=max(iters) if iters else None,
        resumed=resumed,
        s_per_img_from=source,
    )


# -- the runner ------------------------------------------------------------------------------
class Runner:
    """Makes sure runs exist: reuses finished ones, resumes / restarts interrupted ones,
    trains the rest, one at a time. ``launcher(spec, run_dir, mode) -> exit code`` does the
    training (a subprocess by default; tests pass a fake)."""

    def __init__(self, out: Path, launcher: Launcher = launch_subprocess, echo: Callable[[str], None] = print):
        self.out = Path(out)
        self.launcher = launcher
        self.echo = echo
        self.failed: List[str] = []
        self.trained = 0

    def state(self, spec: RunSpec, recipe: Dict) -> str:
        """new | partial | done for the run folder of ``spec`` (see the module doc)."""
        run_dir = spec.run_dir(self.out)
        if not run_dir.exists():
            return "new"
        recorded = read_spec_file(run_dir)
        has_run = any((run_dir / f).exists() for f in TRAINER_FILES) or any(run_dir.glob("model_[0-9]*.pt"))
        if not recorded:
            if has_run:
                raise SuiteError(f"{run_dir} holds a run the suite did not start (no {SPEC_FILE}); move it away")
            return "new"
        changes = diff_recipes(recorded.get("recipe"), recipe)
        if changes:
            more = f" (+{len(changes) - 3} more)" if len(changes) > 3 else ""
            raise SuiteError(
                f"{run_dir} was trained with another recipe ({'; '.join(changes[:3])}{more}); "
                "use another --out or remove that folder"
            )
        if (run_dir / "eval.json").is_file():
            return "done"
        return "partial" if has_run or recorded.get("launches") else "new"

    def ensure(self, spec: RunSpec, label: str = "") -> Optional[RunResult]:
        """The run's result, training it first when needed; None when training failed."""
        recipe = recipe_dict(spec.config, spec.overrides)
        run_dir = spec.run_dir(self.out)
        state = self.state(spec, recipe)
        if state == "done":
            self._speed_pass(spec, run_dir, label)
            return read_run(run_dir, spec.seed)
        mode = "new" if state == "new" else ("resume" if spec.framework == "detkit" else "restart")
        run_dir.mkdir(parents=True, exist_ok=True)
        recorded = read_spec_file(run_dir) or {"spec": asdict(spec), "recipe": recipe, "launches": []}
        launch: Dict[str, Any] = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": mode, "load_before": _loadavg()}
        recorded["launches"].append(launch)
        _write_json(run_dir / SPEC_FILE, recorded)
        verb = {"new": "training", "resume": "resuming", "restart": "restarting"}[mode]
        self.echo(f"{label}{spec.group} {spec.framework} seed {spec.seed}: {verb} in {run_dir}")
        start = time.perf_counter()
        code = self.launcher(spec, run_dir, mode)
        wall_s = time.perf_counter() - start
        launch.update({"rc": code, "wall_s": round(wall_s, 1), "load_after": _loadavg()})
        _write_json(run_dir / SPEC_FILE, recorded)
        self.trained += 1
        if code != 0 or not (run_dir / "eval.json").is_file():
            tail = last_log_line(run_dir / LOG_FILE)
            self.failed.append(f"{spec.group} {spec.name}")
            self.echo(f"  failed (exit code {code}): {tail}  [log: {run_dir / LOG_FILE}]")
            return None
        self._speed_pass(spec, run_dir, label)
        res = read_run(run_dir, spec.seed)
        self.echo(
            f"  done in {wall_s / 60:.1f} min: VOC mAP {_num(res.mAP)}, VOC07 {_num(res.voc07)}, "
            f"training {_num(res.train_minutes, 2)} min, {_num(res.s_per_img, 3)} s/img"
        )
        return res

    def _speed_pass(self, spec: RunSpec, run_dir: Path, label: str) -> None:
        """detkit: time plain inference of a finished run once (see the module doc); a
        failure is reported and the evaluation stage's time stays in use."""
        if spec.framework != "detkit" or (run_dir / SPEED_DIR / "eval.json").is_file():
            return
        self.echo(f"{label}{spec.group} {spec.framework} seed {spec.seed}: timing inference (detkit eval)")
        code = self.launcher(spec, run_dir, "speed")
        if code != 0 or not (run_dir / SPEED_DIR / "eval.json").is_file():
            self.echo(f"  inference pass failed (exit code {code}): {last_log_line(run_dir / LOG_FILE)}")

    def recorded(self, spec: RunSpec) -> Optional[RunResult]:
        """The result of a finished run of ``spec`` without training anything (None when
        there is none; a folder with another recipe is refused as in ``ensure``)."""
        recipe = recipe_dict(spec.config, spec.overrides)
        if self.state(spec, recipe) != "done":
            return None
        return read_run(spec.run_dir(self.out), spec.seed)


def failed_runs(out: Path, specs: Sequence[RunSpec]) -> List[str]:
    """'group framework seed S: last log line' of every run whose last launch failed and
    that has no eval.json (the next start of the suite trains it again)."""
    failed = []
    for spec in specs:
        run_dir = spec.run_dir(out)
        if (run_dir / "eval.json").is_file():
            continue
        launches = read_spec_file(run_dir).get("launches", [])
        if launches and launches[-1].get("rc") not in (0, None):
            failed.append(f"{spec.group} {spec.framework} seed {spec.seed}: {last_log_line(run_dir / LOG_FILE)}")
    return failed


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def last_log_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _num(x: Optional[float], digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# -- statistics and tables -------------------------------------------------------------------
def stats(values: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    """mean, min, max, spread (= max - min) and n over the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"n": len(xs), "mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "spread": max(xs) - min(xs)}


def cell(s: Optional[Dict[str, float]], digits: int) -> str:
    """'mean (min-max)' of a stats dict; one value alone; n/a without values."""
    if s is None:
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def summarize(results: Sequence[RunResult]) -> Dict[str, Any]:
    """Per-metric stats over the runs of one group and framework."""
    return {
        "runs": len(results),
        "seeds": [r.seed for r in results],
        "mAP": stats([r.mAP for r in results]),
        "voc07": stats([r.voc07 for r in results]),
        "train_minutes": stats([r.train_minutes for r in results]),
        "s_per_img": stats([r.s_per_img for r in results]),
        "resumed": [r.seed for r in results if r.resumed],
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> Dict[str, Any]:
    import platform

    import torch
    import torchvision

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def write_report(prefix: Path, markdown: str, data: Dict) -> List[Path]:
    """PREFIX.md and PREFIX.json (written atomically)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, js = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".json")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(markdown.rstrip("\n") + "\n", encoding="utf-8")
    os.replace(tmp, md)
    _write_json(js, data)
    return [md, js]


def finish_report(report: Path, failed: Sequence[str], echo: Callable[[str], None]) -> int:
    """Prints the written report and the failed runs -> the exit status (1 if any failed)."""
    echo(Path(str(report) + ".md").read_text(encoding="utf-8"))
    echo(f"written: {report}.md, {report}.json")
    if failed:
        echo(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their suite.log)")
        return 1
    return 0
