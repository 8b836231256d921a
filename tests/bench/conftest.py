"""Fixtures of the benchmark tests. This folder is a package (see __init__.py) so that this file
does not replace tests/conftest.py as the module `conftest` that other test folders import."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
