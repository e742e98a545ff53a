"""The dashboard's pure JavaScript (lib.js), unit-tested with node's built-in test runner."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from harness import REPO_ROOT


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node (the browser tests cover the page without it)")
def test_dashboard_javascript_units() -> None:
    result = subprocess.run(["node", "--test", "tests/js/"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
