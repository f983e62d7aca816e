"""`make demo` (scripts/demo.sh): it runs on a fresh checkout and says what it shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_labels_its_units_and_says_how_to_browse_the_fake(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), sys.executable],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "second run: 0 requests sent, 19 files already done" in lines
    assert (
        "fake Braze accepted 4 requests: 197 events, 36 purchases, and 611 attribute values "
        "in 55 attributes objects (one per user and request)"
    ) in lines
    assert "what it holds, profile by profile (41): out/demo/profiles.json" in lines
    assert f"  {sys.executable} -m segreplay fake-braze --port 4011 &" in lines
    assert (
        "  then open http://127.0.0.1:4011/_fake/profiles (also /_fake/stats and /_fake/accepted)"
    ) in lines
    assert "day 1: anonymous visitors only: 3 alias-only profiles created" in lines
    assert (
        "day 2: one visitor signs up, then logs in on a second device: "
        "2 profiles merged into usr_demo_ada (/users/identify, /users/merge)"
    ) in lines
    assert "usr_demo_ada now holds 7 events, from both devices" in lines
    profiles = json.loads((tmp_path / "out" / "demo" / "profiles.json").read_text())
    assert len(profiles["profiles"]) == 41
