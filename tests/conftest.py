"""Fixtures shared by the whole suite.

- Every test gets the "detkit" logger back as it found it (``detkit.cli.main`` installs its
  own stderr handler and turns propagation off while it runs; a test that fails half way
  must not leave that behind for the next one).
- ``detkit_log``: caplog for the "detkit" logger, with propagation forced on.
"""

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_detkit_logger():
    logger = logging.getLogger("detkit")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def detkit_log(caplog):
    """caplog for the "detkit" logger (propagation on: the CLI turns it off while it runs)."""
    logger = logging.getLogger("detkit")
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="detkit")
    return caplog
