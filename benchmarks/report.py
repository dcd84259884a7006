"""Turn a pytest-benchmark JSON file into the markdown table of benchmarks/README.md:
samples/s per path and its ratio to the plain-PyTorch reference of the same case.

    python benchmarks/report.py out.json [--machine "2-core x86-64 CPU"]
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections import defaultdict

BASELINES = {"train": "reference_sparse_adagrad", "forward": "reference_forward",
             "topk": "reference_topk"}


def rows_from(path: str):
    data = json.load(open(path))
    cases = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "samples_per_s" not in info:
            continue
        key = (info["kind"], info["dim"], info["batch"])
        cases[key][info["path"]] = info["samples_per_s"]
    return data.get("machine_info", {}), cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--machine", default=None)
    args = parser.parse_args()
    machine, cases = rows_from(args.json)
    name = args.machine or f"{machine.get('cpu', {}).get('brand_raw', '?')}"
    print(f"Machine: {name}; date: {datetime.date.today()}\n")
    print("| kind | K | batch | path | samples/s | × reference |")
    print("|---|---:|---:|---|---:|---:|")
    for (kind, dim, batch), paths in sorted(cases.items()):
        base = paths.get(BASELINES.get(kind, ""))
        for path, rate in sorted(paths.items(), key=lambda kv: kv[1]):
            ratio = f"{rate / base:.1f}" if base else "—"
            print(f"| {kind} | {dim} | {batch} | {path} | {rate / 1e6:.2f} M | {ratio} |")


if __name__ == "__main__":
    main()
