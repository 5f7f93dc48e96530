"""Test hooks for the processes that tests/engine/test_distributed.py starts with torchrun
(it puts this folder on PYTHONPATH, so Python imports this module at start-up; torchrun's
own agent process has no RANK and is left alone). detkit itself runs unchanged
(``-m detkit ...``).

- DETKIT_TEST_GUARD=DIR: in a rank other than 0, any write under DIR (a file opened for
  writing or created, a rename, a removal, a folder made) prints "GUARD VIOLATION" with the
  rank and path and raises PermissionError, so a run where such a rank writes into the run
  folder fails and says where.
- DETKIT_TEST_FAIL=R:I: rank R raises a TrainingError at the start of its training
  iteration I (1-based), while the other ranks go on into the iteration's collectives: a
  rank that fails on its own.
"""

import os
import sys

_RANK = os.environ.get("RANK")


def _install_guard(guard: str) -> None:
    guard = os.path.abspath(guard)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    events = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.link", "os.symlink"}
    events |= {"shutil.rmtree", "shutil.move", "shutil.copyfile"}

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        path = os.path.abspath(os.fsdecode(path))
        return path == guard or path.startswith(guard + os.sep)

    def hook(event, args):
        paths = []
        if event == "open" and args and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if writes:
                paths = [path]
        elif event in events:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        for path in paths:
            if inside(path):
                message = f"GUARD VIOLATION: rank {_RANK} wrote {os.fsdecode(path)} ({event})\n"
                os.write(2, message.encode())
                raise PermissionError(message.strip())

    sys.addaudithook(hook)


def _install_failure(spec: str) -> None:
    fail_rank, fail_iter = (int(v) for v in spec.split(":"))
    if int(_RANK or 0) != fail_rank:
        return
    from detkit.engine import trainer
    from detkit.errors import TrainingError

    original = trainer.Trainer._step

    def failing_step(self, images, targets, it):
        if it + 1 == fail_iter:
            raise TrainingError(f"injected failure at iteration {fail_iter}")
        return original(self, images, targets, it)

    trainer.Trainer._step = failing_step


if _RANK is not None:
    if os.environ.get("DETKIT_TEST_GUARD") and _RANK != "0":
        _install_guard(os.environ["DETKIT_TEST_GUARD"])
    if os.environ.get("DETKIT_TEST_FAIL"):
        _install_failure(os.environ["DETKIT_TEST_FAIL"])
