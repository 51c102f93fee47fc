"""One table from several eval.py reports of the same protocol (chain and zoom together: both score the answer
to the record's question): a row per report (its label); with --diff,
paired differences between reports on the same questions, each with its standard error.

    python tools/compare.py runs/toy/eval/sft.json runs/toy/eval/grpo.json
    python tools/compare.py sft.json control.json grpo.json --diff "GRPO (focus)" SFT --diff "GRPO (focus)" control

A paired difference is the mean over the questions both reports scored of (row - baseline), per question
from each report's per-item file (OUT.items.jsonl, next to the report); its standard error is the sample
standard deviation of those per-question differences over sqrt(n). Metrics: answer_score (the judge's
score), box_acc (IoU > 0.5 with the annotated box) and miou (the IoU itself), where the protocol has them
(the virft and viscot-det protocols score the whole set, not questions: nothing to pair). Questions are paired
by dataset and id; reports of different questions files under one dataset name are refused (eval.py records each
file's hash), and a pairing that leaves out questions of either report says how many.
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from eval import COLUMNS, fmt, is_report, items_path  # noqa: E402

ITEM_METRICS = {"answer_score": lambda item: item.get("answer_score"),
                "box_acc": lambda item: None if item.get("iou") is None else float(item["iou"] > 0.5),
                "miou": lambda item: item.get("iou")}


def read_report(path):
    """(report, {(dataset, id): per-item row}); no items when the report has no per-item file next to it."""
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as e:
        raise common.DataError(f"cannot read the report {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise common.DataError(f"{path} is not an eval.py report (not JSON: {e})") from None
    if not is_report(report):
        raise common.DataError(f"{path} is not an eval.py report (no 'protocol' and 'label')")
    if report["protocol"] not in COLUMNS or not isinstance(report["label"], str):
        raise common.DataError(f"{path}: protocol {report['protocol']!r} is none of eval.py's, or its label "
                               f"{report['label']!r} is not a string")
    items_file = items_path(path)
    items = {}
    if os.path.exists(items_file):
        for lineno, item in common.iter_jsonl(items_file):
            if not isinstance(item.get("id"), (str, int)) or isinstance(item["id"], bool):
                raise common.DataError(f"{items_file}:{lineno}: a per-item row needs 'id' (a string or integer)")
            for key in ("answer_score", "iou"):
                if item.get(key) is not None:
                    common.finite_number(item[key], f"{items_file}:{lineno}", key)
            key = (item.get("dataset"), item["id"])
            if key in items:
                raise common.DataError(f"{items_file}:{lineno}: id {item['id']!r} of dataset {key[0]!r} again: one row "
                                       "per question")
            items[key] = item
    return report, items


def check_same_questions(row, base, reports):
    """Two reports paired on a dataset name must have scored the same questions file (when both say which)."""
    ours, theirs = reports[row].get("questions") or {}, reports[base].get("questions") or {}
    for name in ours.keys() & theirs.keys():
        if ours[name] != theirs[name]:
            raise SystemExit(f"compare.py: {row!r} and {base!r} scored different questions files as dataset "
                             f"{name!r}: their questions cannot be paired")


def paired_difference(items, base_items, metric):
    """(mean difference, standard error, n) of a per-item metric over the items both reports have."""
    get = ITEM_METRICS[metric]
    diffs = [get(items[k]) - get(base_items[k]) for k in items.keys() & base_items.keys()
             if get(items[k]) is not None and get(base_items[k]) is not None]
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd <= 1e-12 * max(1.0, abs(mean)):  # equal differences, but for float rounding: no spread
        sd = 0.0
    return mean, sd / math.sqrt(n), n


def fmt_difference(result):
    if result is None:
        return ""
    mean, se, _ = result
    z = f" ({mean / se:+.1f} SE)" if se > 0 else ""
    return f"{mean:+.3f} ± {se:.3f}{z}"


def main(argv=None):
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("reports", nargs="+", help="eval.py reports (JSON) of one protocol")
    parser.add_argument("--diff", nargs=2, action="append", default=[], metavar=("ROW", "BASELINE"),
                        help="a paired difference ROW - BASELINE, by report label (repeatable)")
    args = parser.parse_args(argv)
    loaded = [read_report(p) for p in args.reports]
    reports = [r for r, _ in loaded]
    labels = [r["label"] for r in reports]
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated is not None:
        raise SystemExit(f"compare.py: two reports are labelled {repeated!r}: eval.py --label tells them apart")
    protocols = {r["protocol"] for r in reports}
    if len(protocols) != 1 and protocols != {"chain", "zoom"}:
        raise SystemExit("compare.py: give one or more eval.py reports of the same protocol (or chain and zoom)")
    cols = COLUMNS[protocols.pop()] if len(protocols) == 1 else ("n", "box_acc", "miou", "answer_score", "zoom_calls")
    print("| model | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in reports:
        print(f"| {r['label']} | " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    if not args.diff:
        return
    by_label = {r["label"]: items for r, items in loaded}
    report_of = {r["label"]: r for r in reports}
    for row, base in args.diff:
        for label in (row, base):
            if label not in by_label:
                raise SystemExit(f"compare.py: --diff names {label!r}; the reports' labels are {sorted(by_label)}")
            if not by_label[label]:
                raise SystemExit(f"compare.py: no per-item file next to the report labelled {label!r}")
        check_same_questions(row, base, report_of)
    first_row = by_label[args.diff[0][0]].values()
    metrics = [m for m in ITEM_METRICS if any(ITEM_METRICS[m](i) is not None for i in first_row)]
    if not metrics:
        raise SystemExit(f"compare.py: --diff: the {reports[0]['protocol']} protocol has no per-question score to "
                         "pair (answer_score, iou)")
    print()
    print("| paired difference | n | " + " | ".join(f"Δ {m} ± SE" for m in metrics) + " |")
    print("|---|---|" + "---|" * len(metrics))
    for row, base in args.diff:
        results = [paired_difference(by_label[row], by_label[base], m) for m in metrics]
        n = next((r[2] for r in results if r), 0)
        if n < 2:
            raise SystemExit(f"compare.py: {row!r} and {base!r} share {n} scored question(s): nothing to pair")
        if n < max(len(by_label[row]), len(by_label[base])):
            print(f"compare.py: {row} − {base} pairs {n} questions of {len(by_label[row])} and "
                  f"{len(by_label[base])}", file=sys.stderr)
        print(f"| {row} − {base} | {n} | " + " | ".join(fmt_difference(r) for r in results) + " |")


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        raise SystemExit(f"compare.py: error: {e}") from None
