"""What the command modules share: logging set-up, reading configs and dataset YAMLs,
run-folder defaults, expanding input globs, and printing an evaluation.

Errors a user can fix are ``detkit.errors.DetkitError``s; ``detkit.cli.main`` prints them
as one line and exits with 2.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from detkit.config import from_dict, load_yaml
from detkit.data.io import IMAGE_EXTENSIONS
from detkit.errors import UsageError
from detkit.schema import Config, DatasetConfig, load_run_config

logger = logging.getLogger("detkit")

__all__ = ["setup_logging", "load_run_config", "load_dataset_yaml", "is_full_config", "default_out", "expand_inputs"]


def setup_logging(verbose: bool = False) -> None:
    """One stderr handler on the "detkit" logger: plain messages, "warning: " before warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbose else "%(message)s"))

    class _Prefix(logging.Filter):
        def filter(self, record):
            if record.levelno >= logging.WARNING and not verbose:
                record.msg = f"warning: {record.msg}"
            return True

    handler.addFilter(_Prefix())
    root = logging.getLogger("detkit")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def is_full_config(path: str) -> bool:
    """A run config (has a ``data`` section) rather than a bare dataset YAML."""
    data, _ = load_yaml(path)
    return isinstance(data, dict) and "data" in data


def load_dataset_yaml(
    path: str, which: str = "test", overrides: Sequence[str] = ()
) -> Tuple[DatasetConfig, Optional[List[str]]]:
    """A dataset YAML ({format: voc, root: ..., split: ...}) or a full config (its data.<which>,
    after the ``a.b.c=value`` overrides; a bare dataset YAML takes none)
    -> (dataset config, the config's class list or None)."""
    if not os.path.isfile(path):
        raise UsageError(f"dataset file not found: {path}")
    data, origins = load_yaml(path)
    if isinstance(data, dict) and "data" in data:
        cfg = load_run_config(path, overrides) if overrides else from_dict(Config, data, origins)
        ds = getattr(cfg.data, which) or cfg.data.test or cfg.data.train
        if ds is None:
            raise UsageError(f"{path}: the config has no data.{which} dataset")
        return ds, cfg.data.classes
    if overrides:
        raise UsageError(f"{path} is a dataset YAML: key=value overrides need a full config (with a data section)")
    return from_dict(DatasetConfig, data, origins), None


def default_out(config_path: str, run_files: Sequence[str], resume: bool = False) -> Path:
    """work_dirs/<config name>, or the first free work_dirs/<config name>_N: a default
    folder never overwrites an earlier run. With ``resume``: the newest of those folders
    that holds a run (so ``detkit train CFG --resume`` continues where the last run stopped)."""
    base = Path("work_dirs") / Path(config_path).stem

    def holds_run(p: Path) -> bool:
        return p.exists() and any((p / f).exists() for f in run_files)

    candidate, n, last = base, 1, None
    while holds_run(candidate):
        last = candidate
        candidate = Path(f"{base}_{n}")
        n += 1
    return last if resume and last is not None else candidate


def expand_inputs(inputs: List[str]) -> List[Path]:
    """Files, folders (their images, sorted) and glob patterns, in the order given."""
    paths: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                logger.warning("no file matches %s", item)
            paths += [Path(m) for m in matches if Path(m).is_file()]
        else:
            paths.append(p)
    return paths
