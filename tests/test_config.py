"""Compile-option settings read from the environment at import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _panel_in_subprocess(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STREAMRNN_PANEL": value}
    code = "import streamrnn.config as c; print(c.PANEL)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("value", ["16", "32"])
def test_panel_override_is_taken(value):
    done = _panel_in_subprocess(value)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == value


@pytest.mark.parametrize("value", ["abc", "24", ""])
def test_bad_panel_warns_and_keeps_the_host_width(value):
    # A tuning knob must never stop the library from importing: it warns and uses the default.
    default = subprocess.run([sys.executable, "-c", "import streamrnn.config as c; print(c._panel_width())"],
                             env={k: v for k, v in os.environ.items() if k != "STREAMRNN_PANEL"},
                             capture_output=True, text=True, check=True).stdout.strip()
    done = _panel_in_subprocess(value)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == default
    assert "STREAMRNN_PANEL must be 16 or 32" in done.stderr
