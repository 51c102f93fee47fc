"""One table from several eval.py reports of the same protocol: a row per report (its label).

    python tools/compare.py runs/toy/eval_base.json runs/toy/eval_sft.json
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import COLUMNS, fmt  # noqa: E402


def main():
    reports = []
    for path in sys.argv[1:]:
        with open(path) as f:
            reports.append(json.load(f))
    if not reports or len({r["protocol"] for r in reports}) != 1:
        raise SystemExit("compare.py: give one or more eval.py reports of the same protocol")
    cols = COLUMNS[reports[0]["protocol"]]
    print("| model | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in reports:
        print(f"| {r['label']} | " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
