"""The manifest of the recorded BM1684X simulator run the sophon tests replay."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.worker.backends.record_sophon_fixture import MANIFEST


@pytest.fixture
def manifest() -> dict[str, Any]:
    return dict(json.loads(MANIFEST.read_text()))
