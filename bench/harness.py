"""Timing and reporting shared by the benchmarks.

Method (see the device notes): warm up, time with CUDA events, take the median of many repeats,
random inputs, several input sets rotated where one set would sit in L2. On the CPU the same
code times with a host clock.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Row:
    """One comparison: our figure, the anchor's, and the target for their ratio."""

    name: str
    unit: str  # "ms", "TB/s", "TFLOP/s", ...
    ours: float | None
    anchor: float | None = None
    anchor_name: str = ""
    # Ratio as "how many times better we are": anchor/ours for times, ours/anchor for rates.
    target: float | None = None
    note: str = ""
    # An absolute bound on our figure in its unit (at most this for times and sizes, at least this
    # for rates), for targets that no anchor of the same run gives (e.g. a memory budget).
    limit: float | None = None
    # Our achieved rate as a fraction of the card's measured ceiling of the same run (copy bandwidth or a
    # GEMM rate), and which ceiling: how far from the card's limit the figure is, whatever the anchor does.
    share: float | None = None
    share_of: str = ""
    ratio: float | None = field(default=None, init=False)
    target_met: bool | None = field(default=None, init=False)

    @property
    def lower_is_better(self) -> bool:
        return self.unit in LOWER_IS_BETTER

    def __post_init__(self) -> None:
        verdicts = []
        if self.ours and self.anchor:
            self.ratio = self.anchor / self.ours if self.lower_is_better else self.ours / self.anchor
            if self.target is not None:
                verdicts.append(self.ratio >= self.target)
        if self.ours is not None and self.limit is not None:
            verdicts.append(self.ours <= self.limit if self.lower_is_better else self.ours >= self.limit)
        if verdicts:
            self.target_met = all(verdicts)


LOWER_IS_BETTER = ("ms", "us", "s", "GB")


def time_ms(fn: Callable[[], object], device: str, repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of one call of `fn` (which queues work on torch's current stream)."""
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def card_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return "cpu"


def write_results(rows: list[Row], device: str, out_dirs: list[Path], meta: dict[str, object]) -> Path:
    """Writes <date>-<card>[-<suites>][-quick].json into each folder and returns the first path (a quick run,
    or one of some suites only (meta "suites"), does not replace a full one of the same day)."""
    stamp = time.strftime("%Y-%m-%d")
    suites = meta.get("suites")
    card = (card_name(device).replace(" ", "-").replace("/", "-") + ("-" + "-".join(suites) if suites else "")
            + ("-quick" if meta.get("quick") else ""))
    doc = {"date": stamp, "card": card_name(device), **meta, "rows": [asdict(r) for r in rows]}
    first: Path | None = None
    for folder in out_dirs:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stamp}-{card}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        first = first or path
    assert first is not None
    return first


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def markdown_table(doc: dict) -> str:
    lines = [
        f"### {doc['card']} — {doc['date']}" + (f" (suites: {', '.join(doc['suites'])})" if doc.get("suites") else "")
        + (" (quick)" if doc.get("quick") else ""),
        "",
        "| benchmark | unit | ours | anchor | ratio | of limit | target | met | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        met = {True: "yes", False: "**no**", None: ""}[r["target_met"]]
        anchor = f"{fmt(r['anchor'])} ({r['anchor_name']})" if r["anchor"] is not None else "—"
        targets = [f"≥ {fmt(r['target'])}×"] if r["target"] is not None else []
        if r.get("limit") is not None:
            targets.append(f"{'≤' if r['unit'] in LOWER_IS_BETTER else '≥'} {fmt(r['limit'])} {r['unit']}")
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else ""
        # .get: results files written before rows had a share still render.
        share = f"{r['share']:.0%} of {r.get('share_of', '')}" if r.get("share") is not None else ""
        lines.append(f"| {r['name']} | {r['unit']} | {fmt(r['ours'])} | {anchor} | {ratio} | {share} "
                     f"| {', '.join(targets)} | {met} | {r.get('note', '')} |")
    return "\n".join(lines)


def regenerate_results_md(results_dir: Path, md_path: Path) -> None:
    """RESULTS.md: one table per GPU results file, newest first (CPU runs are smoke tests, left out)."""
    docs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"), reverse=True)]
    docs = [d for d in docs if d["card"] != "cpu"]
    body = "\n\n".join(markdown_table(d) for d in docs) or "No GPU results yet."
    md_path.write_text(
        "# Benchmark results\n\nGenerated by `python bench/run.py` from `bench/results/*.json`; every "
        "figure comes from a real run on the card named, ours and the anchor in the same run. Ratios "
        "are how many times better we are (time: anchor/ours; rate: ours/anchor). \"Of limit\" is our rate (for "
        "times: the work done over the time) as a fraction of the card's ceiling measured in the same run "
        "(the `ceilings` rows).\n\n" + body + "\n"
    )
