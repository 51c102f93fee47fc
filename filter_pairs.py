"""Preference pairs from gen_pairs.py candidates (SPEC 4.3), for rl_stage1.py / rl_stage2.py.

    python filter_pairs.py --candidates runs/cands.jsonl --out runs/pairs.jsonl [--grpo_out runs/grpo.jsonl]

Per question, over the candidates whose answer and box scores are both known (a null score, from a judge
that failed, takes the candidate out, as VisRL does): keep the question when max s_R >= --answer_high,
min s_R <= --answer_low and max != min. Chosen: the first candidate with s_R = max and s_B >= --box_high.
Rejected: the first with s_R = min and s_B <= --box_low. One pair per question. Prints how many questions
each rule dropped (the first rule a question fails is the one counted).

A pair line: id, image, question, answer (the reference), width, height, chosen_box_text, rejected_box_text,
chosen_answer, rejected_answer, chosen_crop (pixels; stage 2 answers both on it), chosen_box,
rejected_box, and the four scores. --grpo_out also writes every question as a Visual-RFT-style GRPO record
(id, image, problem, solution, bbox).
"""
import os

import common

RULES = ("no_scored_candidates", "max_answer_below_high", "min_answer_above_low", "no_answer_spread",
         "no_chosen_with_box_high", "no_rejected_with_box_low")


def parse_args(argv=None):
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("--candidates", required=True, nargs="+", help="gen_pairs.py output file(s)")
    parser.add_argument("--out", required=True, help="pairs JSONL")
    parser.add_argument("--answer_high", type=common.FRACTION, default=0.8, help="max s_R must reach this")
    parser.add_argument("--answer_low", type=common.FRACTION, default=0.2, help="min s_R must be at most this")
    parser.add_argument("--box_high", type=common.FRACTION, default=0.8,
                        help="the chosen candidate's s_B at least this")
    parser.add_argument("--box_low", type=common.FRACTION, default=0.2,
                        help="the rejected candidate's s_B at most this")
    parser.add_argument("--grpo_out", default=None, help="also write GRPO prompt records (Visual-RFT style)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out/--grpo_out files")
    return parser.parse_args(argv)


def check_question(q, where):
    """A gen_pairs.py line: what pair_row copies, and scores that are finite numbers in [0, 1] or null."""
    if not isinstance(q.get("id"), str) or not isinstance(q.get("candidates"), list):
        raise common.DataError(f"{where}: not a gen_pairs.py line (needs a string id and a candidates list)")
    for key in ("image", "question", "answer"):
        if not isinstance(q.get(key), str):
            raise common.DataError(f"{where}: question {q['id']!r}: field '{key}' must be a string")
    for key in ("width", "height"):
        if isinstance(q.get(key), bool) or not isinstance(q.get(key), int) or q[key] <= 0:
            raise common.DataError(f"{where}: question {q['id']!r}: {key} must be a positive integer, "
                                   f"got {q.get(key)!r}")
    for k, c in enumerate(q["candidates"]):
        if not isinstance(c, dict):
            raise common.DataError(f"{where}: question {q['id']!r}: candidate {k} is not an object")
        for score in ("s_R", "s_B"):
            common.finite_number(c.get(score), f"{where}: question {q['id']!r}: candidate {k}", score, 0, 1,
                                 allow_none=True)
        if c.get("s_R") is not None and c.get("s_B") is not None:
            at = f"{where}: question {q['id']!r}: scored candidate {k}"
            for key in ("box_text", "answer", "crop", "box"):
                if key not in c:
                    raise common.DataError(f"{at} lacks '{key}'")
            if not isinstance(c["box_text"], str) or not (c["answer"] is None or isinstance(c["answer"], str)):
                raise common.DataError(f"{at}: box_text must be a string and answer a string or null")
            for key in ("box_text", "answer"):  # a pair trains on them: rl_stage1/2 would refuse it there
                if token := common.special_token_in(c[key] or ""):
                    raise common.DataError(f"{at}: {key} holds the special token {token}")
            for key in ("crop", "box"):  # null: the box did not parse
                if c[key] is not None:
                    common.check_box(c[key], f"{at}: {key}", q["width"], q["height"])


def select_pair(candidates, args):
    """(chosen, rejected) or (None, rule that dropped the question). A candidate whose box text is empty (the
    sample ended at once) is no response to prefer or reject: left out with the unscored ones."""
    scored = [c for c in candidates if c.get("s_R") is not None and c.get("s_B") is not None and c["box_text"].strip()]
    if not scored:
        return None, "no_scored_candidates"
    best, worst = max(c["s_R"] for c in scored), min(c["s_R"] for c in scored)
    if best < args.answer_high:
        return None, "max_answer_below_high"
    if worst > args.answer_low:
        return None, "min_answer_above_low"
    if best == worst:
        return None, "no_answer_spread"
    chosen = next((c for c in scored if c["s_R"] == best and c["s_B"] >= args.box_high), None)
    if chosen is None:
        return None, "no_chosen_with_box_high"
    rejected = next((c for c in scored if c["s_R"] == worst and c["s_B"] <= args.box_low), None)
    if rejected is None:
        return None, "no_rejected_with_box_low"
    return (chosen, rejected), None


def pair_row(q, chosen, rejected):
    return {"id": q["id"], "image": q["image"], "question": q["question"], "answer": q["answer"],
            "width": q["width"], "height": q["height"],
            "chosen_box_text": chosen["box_text"], "rejected_box_text": rejected["box_text"],
            "chosen_answer": chosen["answer"], "rejected_answer": rejected["answer"],
            "chosen_crop": chosen["crop"], "chosen_box": chosen["box"], "rejected_box": rejected["box"],
            "chosen_s_R": chosen["s_R"], "chosen_s_B": chosen["s_B"],
            "rejected_s_R": rejected["s_R"], "rejected_s_B": rejected["s_B"]}


def main(argv=None):
    args = parse_args(argv)
    if args.grpo_out and os.path.abspath(args.grpo_out) == os.path.abspath(args.out):
        raise common.DataError(f"--grpo_out {args.grpo_out} is --out too: give each its own file")
    for flag, path in (("--out", args.out), ("--grpo_out", args.grpo_out)):
        if path:
            common.claim_output_file(path, flag, args.candidates, args.overwrite)
    questions, seen = [], {}
    for path in args.candidates:
        for lineno, q in common.input_rows(path, "questions"):
            where = f"{path}:{lineno}"
            check_question(q, where)
            common.check_unique(seen, q["id"], where)  # a file given twice would give every pair twice
            questions.append(q)
    pairs, dropped = [], {rule: 0 for rule in RULES}
    for q in questions:
        pair, rule = select_pair(q["candidates"], args)
        if pair is None:
            dropped[rule] += 1
        else:
            pairs.append(pair_row(q, *pair))
    print("| rule | questions dropped |\n|---|---|")
    for rule in RULES:
        print(f"| {rule} | {dropped[rule]} |")
    if not pairs:  # rl_stage1/2 would refuse the empty file; say why here, and write nothing
        raise common.DataError(f"none of the {len(questions)} questions passed the rules (table above): no pairs "
                               "to write; more candidates per question or other thresholds")
    common.write_jsonl(args.out, pairs)
    if args.grpo_out:
        common.write_jsonl(args.grpo_out, [{"id": q["id"], "image": q["image"], "problem": q["question"],
                                            "solution": f"<answer>{q['answer']}</answer>", "bbox": q.get("bbox")}
                                           for q in questions])
    print(f"filter_pairs.py: {len(questions)} questions -> {len(pairs)} pairs -> {args.out}")


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        raise SystemExit(f"filter_pairs.py: error: {e}") from None
