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


def test_row_verdicts() -> None:
    """A row's ratio says how many times better we are; its targets (ratio and absolute limit) must all hold."""
    sys.path.insert(0, str(ROOT / "bench"))
    from harness import Row

    faster = Row("t", "ms", 2.0, anchor=5.0, target=2.5)
    assert faster.ratio == 2.5 and faster.target_met is True
    assert Row("t", "ms", 2.1, anchor=5.0, target=2.5).target_met is False
    assert Row("r", "TB/s", 3.0, anchor=4.0, target=0.8).ratio == 0.75
    assert Row("m", "GB", 17.4, anchor=23.8, limit=18.0).target_met is True
    assert Row("m", "GB", 18.9, anchor=23.8, limit=18.0).target_met is False
    assert Row("m", "GB", 17.4, anchor=30.0, target=2.0, limit=18.0).target_met is False  # both must hold
    assert Row("c", "TB/s", 4.2).target_met is None
