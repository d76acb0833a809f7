"""Runs every benchmark, ours beside the anchor on one device, and writes the results.

    python bench/run.py [--quick] [--cpu] [--out DIR]

Results go to bench/results/<date>-<card>.json (and DIR when given) and bench/RESULTS.md is
regenerated. With --cpu (or no GPU) the harness runs tiny sizes on the CPU backend: a smoke test
of the harness itself, never a result to report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cudablocks as cb  # noqa: E402
from harness import Row, regenerate_results_md, write_results  # noqa: E402
from suites import SUITES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a few minutes on a GPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU backend at tiny sizes (harness check)")
    parser.add_argument("--out", type=Path, help="also write the results JSON into this folder")
    parser.add_argument("--only", nargs="*", help="run only these suites: " + ", ".join(SUITES))
    args = parser.parse_args()

    device = "cuda:0" if (cb.cuda_device_count() > 0 and not args.cpu) else "cpu"
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[Row] = []
    for name, suite in SUITES.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        for row in suite(device, quick=args.quick or device == "cpu"):
            rows.append(row)
            ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
            met = "" if row.target_met is None else ("  target met" if row.target_met else "  TARGET MISSED")
            share = f"  {row.share:.0%} of {row.share_of}" if row.share is not None else ""
            print(f"  {row.name:<48} {row.ours or 0:>10.4g} {row.unit:<8} {ratio}{met}{share}", flush=True)

    here = Path(__file__).resolve().parent
    outs = [args.out] if args.out else []
    if device != "cpu":
        outs.insert(0, here / "results")
    path = write_results(rows, device, outs or [here / "results_cpu"], {"quick": args.quick, "torch": torch.__version__, **({"suites": args.only} if args.only else {})})
    if device != "cpu":
        regenerate_results_md(here / "results", here / "RESULTS.md")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
