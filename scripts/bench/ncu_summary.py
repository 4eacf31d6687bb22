#!/usr/bin/env python3
"""Per-kernel GPU time from an Nsight Compute CSV (ncu --csv --metrics gpu__time_duration.sum).

    ncu --clock-control none --metrics gpu__time_duration.sum --csv --launch-skip S --launch-count N \
        build/ossrl bench generate --batch 1 --new-tokens 12 --no-cuda-graphs > kernels.csv
    python3 scripts/bench/ncu_summary.py kernels.csv [--per NAME]

Prints, for each kernel (namespaces dropped), its launches, total and mean µs and share of the
total, largest first. With --per, totals are also divided by the launches of the kernel whose
name contains NAME (e.g. sample_kernel: one per decode step) to give µs per step. ncu runs each
kernel alone, so the times exclude launch gaps and overlap: they are each kernel's own cost.
"""
import argparse
import collections
import csv
import re


def short(name):
    name = re.sub(r"\(anonymous namespace\)::|ossrl::cuda::|ossrl::|void ", "", name)
    return name if len(name) <= 110 else name[:107] + "..."


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--per", default="sample_kernel", help="kernel that marks one step")
    args = parser.parse_args()
    with open(args.csv, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's own messages are not CSV rows
    total_us = collections.defaultdict(float)
    launches = collections.Counter()
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}[row["Metric Unit"]]
        name = short(row["Kernel Name"])
        total_us[name] += value * scale
        launches[name] += 1
    steps = sum(n for name, n in launches.items() if args.per in name)
    grand = sum(total_us.values())
    header = f"{'launches':>8} {'total µs':>10} {'mean µs':>8} {'share':>6}"
    print(header + (f" {'µs/step':>8}" if steps else "") + "  kernel")
    for name, us in sorted(total_us.items(), key=lambda kv: -kv[1]):
        line = f"{launches[name]:>8} {us:>10.1f} {us / launches[name]:>8.2f} {100 * us / grand:>5.1f}%"
        print(line + (f" {us / steps:>8.1f}" if steps else "") + f"  {name}")
    print(f"{sum(launches.values()):>8} {grand:>10.1f}" + (f"   steps: {steps}, µs/step {grand / steps:.1f}" if steps else ""))


if __name__ == "__main__":
    main()
