"""The benchmark harness runs end to end on the CPU backend (a smoke test; no figures checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_runs_on_cpu(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    files = list(tmp_path.glob("*-cpu.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["rows"] and all(r["ours"] and r["ours"] > 0 for r in doc["rows"])
