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
    files = list(tmp_path.glob("*-cpu*.json"))
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


def test_share_of_ceiling() -> None:
    """A rate against this run's measured ceiling: the largest GEMM size of that precision, or the copy bandwidth;
    nothing where the ceiling (or the rate) is unknown."""
    sys.path.insert(0, str(ROOT / "bench"))
    from suites import MEASURED_TFLOPS, share_of_ceiling

    saved = dict(MEASURED_TFLOPS)
    try:
        MEASURED_TFLOPS.clear()
        assert share_of_ceiling("bf16", 500.0) == {}
        assert share_of_ceiling("copy", 3.0) == {}
        MEASURED_TFLOPS.update({("copy TB/s", 0): 4.0, ("bf16", 4096): 600.0, ("bf16", 8192): 800.0})
        assert share_of_ceiling("copy", 3.0) == {"share": 0.75, "share_of": "copy bandwidth"}
        assert share_of_ceiling("bf16", 500.0) == {"share": 0.625, "share_of": "bf16 GEMM"}
        assert share_of_ceiling("tf32", 100.0) == {}
        assert share_of_ceiling("bf16", None) == {}
    finally:
        MEASURED_TFLOPS.clear()
        MEASURED_TFLOPS.update(saved)


def test_markdown_shows_share() -> None:
    """The "of limit" column: a row's share of a ceiling, and empty for rows (or older files) without one."""
    from dataclasses import asdict

    sys.path.insert(0, str(ROOT / "bench"))
    from harness import Row, markdown_table

    row = asdict(Row("block bf16 8x512 fwd+bwd", "ms", 10.0, anchor=20.0, anchor_name="transformers",
                     share=0.62, share_of="bf16 GEMM"))
    old = {"name": "old", "unit": "ms", "ours": 1.0, "anchor": None, "anchor_name": "", "target": None,
           "note": "", "ratio": None, "target_met": None}  # a row from before `limit` and `share`
    lines = markdown_table({"card": "H100", "date": "2026-01-01", "rows": [row, old]}).splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[4:6] == ["ratio", "of limit"]
    cells = [c.strip() for c in lines[4].strip("|").split("|")]
    assert len(cells) == len(header) and cells[4:6] == ["2.00×", "62% of bf16 GEMM"]
    cells = [c.strip() for c in lines[5].strip("|").split("|")]
    assert len(cells) == len(header) and cells[5] == ""


def test_a_run_of_some_suites_does_not_replace_the_full_run(tmp_path: Path) -> None:
    """--only names its file after the suites (and says so in the document), so the day's full run stays."""
    sys.path.insert(0, str(ROOT / "bench"))
    from harness import Row, write_results

    rows = [Row("t", "ms", 1.0)]
    full = write_results(rows, "cpu", [tmp_path], {"quick": False})
    some = write_results(rows, "cpu", [tmp_path], {"quick": False, "suites": ["nf4", "classify"]})
    assert full != some and full.exists() and some.exists()
    assert some.name.endswith("-cpu-nf4-classify.json")
    assert json.loads(some.read_text())["suites"] == ["nf4", "classify"]
    assert "suites" not in json.loads(full.read_text())
