"""Shared fixtures of the data-layer tests."""

import logging

import pytest


@pytest.fixture
def detkit_log(caplog):
    """caplog for the "detkit" logger (propagation forced on, as the CLI turns it off while
    it runs)."""
    logger = logging.getLogger("detkit")
    propagate, logger.propagate = logger.propagate, True
    caplog.set_level(logging.INFO, logger="detkit")
    yield caplog
    logger.propagate = propagate
