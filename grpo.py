"""Online GRPO with verifiable visual rewards (Visual-RFT; SPEC 4.6), written out, and its VisRL form: the
two-step focus chain rolled out whole and rewarded by the answer alone.

For each prompt the policy samples G completions; each gets r = sum_k w_k * reward_k. Advantages are
group-relative, A_i = (r_i - mean_group) / (std_group + 1e-4) (--scale_rewards), 0 for a group whose rewards
are all equal. Every completion token t of rollout i gets

    loss_it = -min(ratio_it * A_i, clip(ratio_it, 1 - eps, 1 + eps_high) * A_i) + beta * KL_it
    ratio_it = exp(log pi(o_it) - log pi_old(o_it))     (= 1, with a gradient, at one update per generation)
    KL_it    = exp(ref_it - log pi(o_it)) - (ref_it - log pi(o_it)) - 1     (k3, float32, log-ratio clamped)

with log-probs at the sampling temperature, EOS included, nothing after it. Aggregation (--loss_aggregation):
seq-mean-token-mean (Visual-RFT: mean over a rollout's tokens, then over rollouts), token-mean (DAPO: over
every token of the optimizer step) or dr-grpo (sum / (rollouts * max completion tokens); the zoom task's
default); the normalisers count the whole optimizer step, every micro-batch and rank.

Tasks (--task) and their default rewards (--rewards, weights --reward_weights):
  detection       Visual-RFT detection: format, det_iou, det_confidence (its published parser and matching,
                  quirks kept; det_*_strict: our strict parser); `solution` holds the boxes
  classification  Visual-RFT classification: format, cls (exact, non-empty; cls_virft: its published
                  substring rule, which an empty answer wins); `solution` holds the label. --math_verify puts
                  the published rewards' symbolic check (math_verify) before det_iou, det_confidence, cls_virft
  grounding       one box (our `bbox` in pixels, or a `solution` box in --box_format): grounding_giou
  focus           VisRL's chain as one rollout: box (step 1) -> crop -> answer (step 2); reward: answer
                  (rule judge on the record's answer). Both steps' tokens get the rollout's advantage; an
                  unparsable box ends the rollout with reward 0, and so does a box step that ran out of tokens
                  without its end of turn (--box_must_end: read leniently, text after the box was free, and a
                  run drifted there).
  zoom            multi-turn zoom (README "Zoom"): each turn the policy answers or writes <zoom>box</zoom>, and
                  the runtime shows it that region of the image as the next turn, up to --max_turns turns;
                  reward: answer (add zoom_tool for DeepEyes' tool bonus, granted only with a right answer, or
                  zoom_used for any call, and zoom_format to score a conversation that answered with every
                  call well-formed above one that did not). One sequence per rollout: every model turn is
                  trained, the tool turns (the views) are not; an unparsable call ends the rollout with reward 0.

Data: our records (id, image, question, answer, bbox) or Visual-RFT records (image, problem, solution);
filter_pairs.py --grpo_out writes the latter for our questions. A record with `problem` is prompted with it
as is; otherwise grounding uses VisRL's focus prompt and detection/classification the bare question.

    python grpo.py --task focus --model runs/sft_merged --data prompts.jsonl --image_root imgs --output_dir runs/grpo
    deepspeed --num_gpus 8 grpo.py --deepspeed configs/zero3.json ...   |   torchrun --nproc_per_node 8 ...

Each prompt's image goes through the vision tower once per generation, not once per completion; with the
vision tower frozen, those features also serve the old, reference and training passes. With LoRA, the
adapter is folded into the weights while generating (--merge_for_generation); under ZeRO-3 generation
runs on the gathered model. --batch_size counts prompts (each gives G rollouts). Outputs:
OUT/metrics.jsonl, OUT/samples.jsonl (completions with rewards every --sample_steps), checkpoints,
OUT/final.
"""
import argparse
import contextlib
import math
import os
import re
import time

import torch

import common
from common import Example, Runtime

TASKS = ("detection", "classification", "grounding", "focus", "zoom")
DEFAULT_REWARDS = {"detection": "format,det_iou,det_confidence", "classification": "format,cls",
                   "grounding": "grounding_giou", "focus": "answer", "zoom": "answer"}
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "dr-grpo")
RECORD_FIELDS = ("solution", "answer", "bbox", "width", "height", "resized_hw")


def parse_args(argv=None):
    parser = common.ArgumentParser(__doc__)
    g = parser.add_argument_group("data and task")
    g.add_argument("--data", required=True, help="prompts: our records or Visual-RFT records (JSONL)")
    g.add_argument("--image_root", default=None, help="image root (default: the data file's directory)")
    g.add_argument("--eval_data", default=None, help="held-out prompts: greedy rollouts scored at start, end and "
                                                     "every --eval_steps")
    g.add_argument("--eval_steps", type=common.COUNT, default=0,
                   help="evaluate every N steps (0: at the start and end)")
    g.add_argument("--task", default="focus", choices=TASKS, help="what a rollout is and which rewards apply")
    g.add_argument("--rewards", default=None, help="comma-separated reward functions (default: the task's)")
    g.add_argument("--reward_weights", default=None, help="comma-separated weights (default: all 1)")
    g.add_argument("--rule_metric", default="f1", choices=sorted(common.RULE_JUDGES), help="the answer reward's judge")
    g.add_argument("--math_verify", action="store_true",
                   help="det_iou, det_confidence, cls_virft: first ask math_verify, as Visual-RFT's rewards do (1 "
                        "when it finds the completion equal to the solution); needs `pip install math-verify`")
    g.add_argument("--box_format", default="viscot", choices=common.BOX_FORMAT_CHOICES,
                   help="box text format (SPEC 3); native: the model family's")
    g.add_argument("--prompt_set", default="visrl", choices=sorted(common.PROMPT_SETS), help="prompt wording")
    r = parser.add_argument_group("GRPO")
    r.add_argument("--num_generations", type=common.bounded(int, 2), default=8,
                   help="G: completions per prompt (at least 2: a group of one has no advantage)")
    r.add_argument("--max_new_tokens", type=common.POSITIVE_INT, default=256,
                   help="completion tokens per step (per turn for zoom)")
    r.add_argument("--max_turns", type=common.POSITIVE_INT, default=None,
                   help="zoom: model turns per rollout, default 3 (a rollout still calling at the last scores 0)")
    r.add_argument("--max_context", type=common.POSITIVE_INT, default=None,
                   help="zoom: a rollout's whole length in tokens (prompt, images, turns); a call that would "
                        "leave no room for a next turn of --max_new_tokens ends it (default: no limit)")
    r.add_argument("--temperature", type=common.TEMPERATURE, default=1.0,
                   help="sampling temperature (also in the log-probs)")
    r.add_argument("--beta", type=common.NONNEGATIVE, default=0.04, help="KL weight; 0 loads no reference model")
    r.add_argument("--epsilon", type=common.bounded(float, 0, 1, open_low=True, open_high=True), default=0.2,
                   help="ratio clip: lower bound 1 - epsilon")
    r.add_argument("--epsilon_high", type=common.POSITIVE, default=None,
                   help="upper bound 1 + this (default: --epsilon)")
    r.add_argument("--num_iterations", type=common.POSITIVE_INT, default=1,
                   help="optimizer updates per generated batch")
    r.add_argument("--scale_rewards", default="group", choices=["group", "batch", "none"],
                   help="divide centred rewards by the group's std, the batch's, or nothing (Dr. GRPO)")
    r.add_argument("--loss_aggregation", default=None, choices=AGGREGATIONS,
                   help="loss normaliser (default: seq-mean-token-mean, Visual-RFT's; dr-grpo for --task zoom)")
    r.add_argument("--mask_truncated", action="store_true", help="no loss on rollouts that hit --max_new_tokens")
    r.add_argument("--box_must_end", action=argparse.BooleanOptionalAction, default=True,
                   help="focus: a box step that runs to --max_new_tokens without its end-of-turn is no box (the "
                        "rollout scores 0); --no-box_must_end reads a box at the start of any box step")
    r.add_argument("--reference", default=None, choices=["adapter_disabled", "model"],
                   help="reference log-probs from the policy with its LoRA off (default for a new LoRA) or a frozen "
                        "copy of the starting model (--ref_model)")
    r.add_argument("--ref_model", default=None, help="--reference model: its directory (default: the starting model)")
    r.add_argument("--merge_for_generation", action=argparse.BooleanOptionalAction, default=True,
                   help="LoRA: fold the adapter into the weights while generating (restored exactly after)")
    r.add_argument("--sample_steps", type=common.COUNT, default=10,
                   help="write one group's completions at the first step and every N steps")
    r.add_argument("--eval_batch_size", type=common.POSITIVE_INT, default=32,
                   help="prompts per generate call when evaluating")
    common.add_model_args(parser)
    common.add_finetune_args(parser)
    common.add_runtime_args(parser)
    parser.set_defaults(lr=1e-6, epochs=2.0, batch_size=2, warmup_ratio=0.0)
    args = parser.parse_args(argv)
    common.check_zoom_flags(parser, args, args.task == "zoom", "--task zoom")
    args.rewards = (args.rewards or DEFAULT_REWARDS[args.task]).split(",")
    unknown = [n for n in args.rewards if n not in REWARDS]
    if unknown:
        parser.error(f"unknown reward(s) {unknown}; choose from {sorted(REWARDS)}")
    zoom_only = [n for n in args.rewards if n in ("zoom_used", "zoom_tool", "zoom_format")]
    if zoom_only and args.task != "zoom":
        parser.error(f"reward(s) {zoom_only} score zoom calls: only --task zoom makes any")
    if args.math_verify:
        if not set(args.rewards) & set(SYMBOLIC_FIRST):
            parser.error(f"--math_verify applies to the {', '.join(SYMBOLIC_FIRST)} rewards, none of them in --rewards")
        try:
            import math_verify  # noqa: F401 - checked here, used by symbolic_match
        except ImportError:
            parser.error("--math_verify needs the math-verify package: pip install math-verify")
    try:
        args.reward_weights = [common.finite_number(float(w), "--reward_weights", "each weight")
                               for w in (args.reward_weights or ",".join(["1"] * len(args.rewards))).split(",")]
    except (ValueError, common.DataError) as e:
        parser.error(f"--reward_weights takes comma-separated finite numbers ({e})")
    if len(args.reward_weights) != len(args.rewards):
        parser.error(f"{len(args.reward_weights)} --reward_weights for {len(args.rewards)} --rewards")
    if args.loss_aggregation is None:
        # A zoom rollout's turns run to tens of tokens and a direct answer to two: averaged per rollout, the
        # answer's tokens weighed twenty times more, and GRPO drove the policy away from zooming while zooming
        # earned more (README "Zoom").
        args.loss_aggregation = "dr-grpo" if args.task == "zoom" else "seq-mean-token-mean"
    if args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    if args.reference is None:
        args.reference = "adapter_disabled" if args.finetune == "lora" and not args.adapter else "model"
    if args.beta and args.reference == "adapter_disabled" and (args.adapter or args.finetune != "lora"):
        parser.error("--reference adapter_disabled needs a new LoRA on the starting model (with --adapter it would "
                     "be the base, not the model this stage starts from: merge the adapter first)")
    return args


# --------------------------------------------------------------------------------------------- rewards
# Each: (completions, **record fields as lists aligned with completions, **options) -> list of floats.
# Unparsable output scores 0; nothing here raises on model output.

THINK_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def _first_given(first, second, n):
    """Per record, the first field it has (records of both formats can share a batch)."""
    first, second = first or [None] * n, second or [None] * n
    return [a if a is not None else b for a, b in zip(first, second)]


def format_reward(completions, **_):
    """1 when the whole output is <think>...</think> <answer>...</answer>."""
    return [float(THINK_ANSWER.fullmatch(c or "") is not None) for c in completions]


def virft_iou(gt, pred):
    """Visual-RFT's IoU on the 0..1000 grid as published (corners taken as given: reversed boxes score 0)."""
    gx1, gy1, gx2, gy2 = gt
    px1, py1, px2, py2 = pred
    ix1, iy1, ix2, iy2 = max(gx1, px1), max(gy1, py1), min(gx2, px2), min(gy2, py2)
    if ix2 <= ix1 or iy2 <= iy1:
        return 0.0
    inter = (ix2 - ix1) * (iy2 - iy1)
    return inter / ((gx2 - gx1) * (gy2 - gy1) + (px2 - px1) * (py2 - py1) - inter)


def virft_matches(completion, solution):
    """Visual-RFT's reward-side matching as published: the completion read as common.virft_detection_json's
    "reward" reading (its first item must be an object), duplicate Positions dropped (first kept), sorted by
    Confidence (high first, ties in order), each greedily given the not-yet-matched ground-truth box of highest
    IoU (the first of equal ones), a match when IoU > 0.5. Returns ([(IoU or 0, confidence), ...], number of
    ground-truth boxes); raises wherever the published code raises (the reward is then 0)."""
    pred, gt = common.virft_detection_json(completion, "reward"), common.virft_detection_json(solution, "solution")
    if pred is None or type(pred[0]) is not dict:  # [] raises here: nothing predicted scores 0
        raise ValueError("no detections")
    taken, out = set(), []
    unique = common.first_unique(pred, lambda p: tuple(p["Position"]))
    for p in sorted(unique, key=lambda p: p["Confidence"], reverse=True):
        best, best_j = 0, -1
        for j, g in enumerate(gt):
            if j not in taken:
                iou = virft_iou(g["Position"], p["Position"])
                if iou > best:
                    best, best_j = iou, j
        if best > 0.5:
            taken.add(best_j)
        else:
            best = 0
        out.append((best, p["Confidence"]))
    return out, len(gt)


def symbolic_match(completions, solution):
    """What Visual-RFT's det and cls rewards try first (--math_verify): math_verify's verify(parse(completion),
    parse(solution)), any error read as no. Its parse pulls one number or expression out of free text, so a
    box that shares a coordinate with the solution's, or 'Boeing 747-400' against 'Boeing 747-100', counts as
    equal and earns the full reward."""
    from math_verify import parse, verify
    out = []
    for c, sol in zip(completions, solution):
        try:
            out.append(float(verify(parse(c), parse(sol))) > 0)
        except Exception:  # noqa: BLE001 - the published code reads any failure as "not equal"
            out.append(False)
    return out


def symbolic_first(scores, completions, solution, math_verify):
    """scores, with 1 wherever --math_verify's symbolic_match holds (the published order: that check first)."""
    if not math_verify:
        return scores
    return [1.0 if same else v for v, same in zip(scores, symbolic_match(completions, solution))]


def _virft_detection_scores(completions, solution, which):
    scores = []
    for c, sol in zip(completions, solution):
        try:
            matched, n_gt = virft_matches(c, sol)
            iou_sum = conf_sum = 0.0  # the published code sums both for either reward: a confidence that
            for iou, conf in matched:  # is not a number voids the IoU reward too
                iou_sum += iou
                conf_sum += (1 - iou) * (1 - conf) if iou == 0 else conf
            if which == "iou":
                score = float(min(iou_sum / max(n_gt, len(matched)), 1.0))
            else:
                score = float(min(max(conf_sum / len(matched), 0.0), 1.0))
        except Exception:  # what the published code scores 0
            score = 0.0
        scores.append(score if math.isfinite(score) else 0.0)  # a NaN confidence would poison the whole batch
    return scores


def det_iou_reward(completions, solution, math_verify=False, **_):
    """Visual-RFT's det IoU reward, as published: sum of matched IoUs / max(#ground truth, #predictions),
    capped at 1; an empty list, 'No Objects' or anything unreadable scores 0."""
    return symbolic_first(_virft_detection_scores(completions, solution, "iou"), completions, solution, math_verify)


def det_confidence_reward(completions, solution, math_verify=False, **_):
    """Visual-RFT's det confidence reward, as published: mean over predictions of the confidence when
    matched, 1 - confidence when not, clipped to [0, 1] (confidences as given, not clipped one by one)."""
    return symbolic_first(_virft_detection_scores(completions, solution, "confidence"), completions, solution,
                          math_verify)


def match_detections(pred, gt):
    """Our strict matching (det_*_strict) on parsed detections: duplicate positions dropped (first kept),
    predictions by confidence (high first), each greedily matched to the unmatched ground-truth box of
    highest IoU, a match when IoU > 0.5. Returns the predictions in that order with their IoU (0 if unmatched)."""
    unique = sorted(common.first_unique(pred, lambda p: tuple(p[0])), key=lambda p: -p[1])
    free, out = list(range(len(gt))), []
    for box, conf in unique:
        ious = [(common.box_iou(box, gt[j][0]) if box[2] > box[0] and box[3] > box[1] else 0.0, j) for j in free]
        best, j = max(ious, default=(0.0, None))
        if best > 0.5:
            free.remove(j)
            out.append((box, conf, best))
        else:
            out.append((box, conf, 0.0))
    return out


def _strict_detection_scores(completions, solution, which):
    scores = []
    for c, sol in zip(completions, solution):
        pred, gt = common.read_detections(c), common.read_detections(sol)
        if pred is None or gt is None:
            scores.append(0.0)
        elif not pred:  # nothing predicted: right only when there is nothing to find
            scores.append(float(not gt))
        else:
            matched = match_detections(pred, gt)
            if which == "iou":
                scores.append(min(1.0, sum(iou for _, _, iou in matched) / max(len(gt), len(matched))))
            else:
                conf = [min(1.0, max(0.0, c)) for _, c, _ in matched]
                scores.append(sum(c if iou > 0 else 1 - c for c, (_, _, iou) in zip(conf, matched)) / len(matched))
    return scores


def det_iou_strict_reward(completions, solution, **_):
    """det_iou on our strict parser (common.read_detections): a malformed item voids the answer instead of
    being skipped, complete items of a cut-off list all count, 'No Objects' against no objects scores 1."""
    return _strict_detection_scores(completions, solution, "iou")


def det_confidence_strict_reward(completions, solution, **_):
    """det_confidence on the strict parser, each confidence clipped to [0, 1] before the mean."""
    return _strict_detection_scores(completions, solution, "confidence")


def cls_reward(completions, solution=None, answer=None, **_):
    """1 when the normalised answer equals the normalised label (non-empty); no substring credit."""
    out = []
    for c, label in zip(completions, _first_given(solution, answer, len(completions))):
        want = common.normalize_class_label(label or "")
        out.append(float(bool(want) and common.normalize_class_label(c or "") == want))
    return out


def cls_virft_reward(completions, solution=None, answer=None, math_verify=False, **_):
    """Visual-RFT's classification reward, as published: the first single-line <answer> content of the
    completion (else the whole completion) and of the label, stripped, then common.virft_class_match --
    substring credit either way, so an empty answer scores 1 (a reward a policy learns to hack)."""
    out, labels = [], _first_given(solution, answer, len(completions))
    for c, label in zip(completions, labels):
        c, label = (v if isinstance(v, str) else "" for v in (c, label))
        found, want = common.virft_answer(c), common.virft_answer(label)
        out.append(float(common.virft_class_match((c if found is None else found).strip(),
                                                  (label if want is None else want).strip())))
    return symbolic_first(out, completions, labels, math_verify)


def _grounding_pairs(completions, bbox, solution, width, height, resized_hw, box_format):
    """(predicted pixel box or None, ground-truth pixel box or None) per completion. resized_hw: the
    processor's resized (height, width) per record, which the qwen25 format needs."""
    n = len(completions)
    bbox, solution, resized_hw = bbox or [None] * n, solution or [None] * n, resized_hw or [None] * n
    for c, box, sol, w, h, rhw in zip(completions, bbox, solution, width, height, resized_hw):
        gt = box if box is not None else common.parse_box(common.extract_answer(sol or ""), box_format, w, h, rhw)
        yield common.parse_box(common.extract_answer(c or ""), box_format, w, h, rhw), gt


def grounding_giou_reward(completions, width, height, bbox=None, solution=None, resized_hw=None,
                          box_format="viscot", **_):
    """GIoU + 1 (0..2) of the one predicted box; unparsable: 0."""
    return [common.box_giou(p, g) + 1 if p and g else 0.0
            for p, g in _grounding_pairs(completions, bbox, solution, width, height, resized_hw, box_format)]


def grounding_iou_reward(completions, width, height, bbox=None, solution=None, resized_hw=None,
                         box_format="viscot", **_):
    """IoU of the one predicted box; unparsable: 0."""
    return [common.box_iou(p, g) if p and g else 0.0
            for p, g in _grounding_pairs(completions, bbox, solution, width, height, resized_hw, box_format)]


def answer_reward(completions, answer=None, solution=None, rule_metric="f1", **_):
    """The rule judge of gen_pairs.py (exact / F1 / ANLS) on the <answer> content (or the whole output)
    against the record's answer (or its solution's <answer> content)."""
    judge = common.RULE_JUDGES[rule_metric]
    return [judge(common.extract_answer(c), common.extract_answer(ref or "")) if c else 0.0
            for c, ref in zip(completions, _first_given(answer, solution, len(completions)))]


def zoom_used_reward(completions, calls, **_):
    """1 when the rollout made at least one zoom call."""
    return [float(n > 0) for n in calls]


def zoom_tool_reward(completions, calls, answer=None, solution=None, rule_metric="f1", **_):
    """DeepEyes' tool bonus: 1 when the rollout zoomed and its answer scores full marks (a call alone earns
    nothing, so the policy is not paid to zoom without need)."""
    right = answer_reward(completions, answer, solution, rule_metric)
    return [float(n > 0 and r >= 1.0) for n, r in zip(calls, right)]


def zoom_format_reward(completions, **_):
    """1 for a conversation that answered with every call well-formed. score() zeroes the others (an unclosed
    or unparsable call, or still calling when the turns or the context ran out), so this term sets them below
    a wrong answer: without it the two tie at 0, and GRPO can bend a call's closing tag at no cost."""
    return [1.0] * len(completions)


REWARDS = {"format": format_reward, "det_iou": det_iou_reward, "det_confidence": det_confidence_reward,
           "det_iou_strict": det_iou_strict_reward, "det_confidence_strict": det_confidence_strict_reward,
           "cls": cls_reward, "cls_virft": cls_virft_reward, "grounding_giou": grounding_giou_reward,
           "grounding_iou": grounding_iou_reward, "answer": answer_reward, "zoom_used": zoom_used_reward,
           "zoom_tool": zoom_tool_reward, "zoom_format": zoom_format_reward}
SYMBOLIC_FIRST = ("det_iou", "det_confidence", "cls_virft")  # the published rewards that try math_verify first
# The record fields each reward reads (one of them must be given): read_prompts checks every record up front,
# so a reward that does not fit the data is refused by name instead of failing at its first step.
REWARD_FIELDS = {"det_iou": ("solution",), "det_confidence": ("solution",), "det_iou_strict": ("solution",),
                 "det_confidence_strict": ("solution",), "cls": ("solution", "answer"),
                 "cls_virft": ("solution", "answer"), "grounding_giou": ("bbox", "solution"),
                 "grounding_iou": ("bbox", "solution"), "answer": ("answer", "solution"),
                 "zoom_tool": ("answer", "solution")}


# ------------------------------------------------------------------------------------------------ data

def read_prompts(path, image_root, task, rewards=()):
    """Prompt records, checked for what the task and its rewards need, ids unique, every image decoded and
    checked against its record (common.check_images); errors name file and line, or the record."""
    need = {"detection": ("solution",), "classification": ("solution", "answer"),
            "grounding": ("bbox", "solution"), "focus": ("answer", "solution"), "zoom": ("answer", "solution")}[task]
    prompts, seen = [], {}
    for lineno, rec in common.input_rows(path, "prompts"):
        where = f"{path}:{lineno}"
        text = rec.get("problem") if "problem" in rec else rec.get("question")
        if not isinstance(rec.get("image"), str) or not isinstance(text, str) or not text.strip():
            raise common.DataError(f"{where}: needs 'image' and a non-empty 'problem' or 'question'")
        for key in ("answer", "solution"):  # a number here would be read as no answer: every reward 0
            if rec.get(key) is not None and not (isinstance(rec[key], str) and rec[key].strip()):
                raise common.DataError(f"{where}: '{key}' must be a non-empty string, got {rec[key]!r}")
        if not any(rec.get(k) is not None for k in need):
            raise common.DataError(f"{where}: the {task} task needs '{' or '.join(need)}'")
        for name in rewards:
            if REWARD_FIELDS.get(name) and not any(rec.get(k) is not None for k in REWARD_FIELDS[name]):
                raise common.DataError(f"{where}: the {name} reward (--rewards) reads "
                                       f"'{' or '.join(REWARD_FIELDS[name])}', which this record lacks")
        if rec.get("bbox") is not None:
            common.validate_record(dict(rec, question=text, answer="-", id=str(rec.get("id", lineno))), where)
        rec = dict(rec, id=str(rec.get("id", f"line{lineno}")))
        common.check_unique(seen, rec["id"], where)
        prompts.append({"rec": rec, "text": text, "raw": "problem" in rec})
    for p, (w, h) in zip(prompts, common.check_images([p["rec"] for p in prompts], image_root)):
        p["rec"]["width"], p["rec"]["height"] = w, h
    return prompts


def check_solution_boxes(prompts, box_format):
    """A grounding record without `bbox` has its ground truth in `solution`, in the run's box format: it must
    hold a box inside its image (the rewards would clamp a box past the edge into another region, and score an
    unparsable one 0 for every rollout, without a word)."""
    for p in prompts:
        rec = p["rec"]
        if rec.get("bbox") is None:
            where = f"record {rec['id']!r}: solution {rec['solution']!r}"
            box = common.parse_box(common.extract_answer(rec["solution"]), box_format, rec["width"], rec["height"],
                                   rec.get("resized_hw"), clamp=False)
            if box is None:
                raise common.DataError(f"{where} holds no {box_format} box (--box_format)")
            common.check_box(box, f"{where}: its box", rec["width"], rec["height"])


def first_messages(prompt, task, prompt_set):
    """The prompt of a rollout's first (for focus: box) step."""
    if task == "zoom":
        return common.zoom_messages(prompt["text"])
    if task == "focus":
        return common.focus_messages(prompt["text"], prompt_set)
    if prompt["raw"] or task != "grounding":
        return common.direct_messages(prompt["text"])
    return common.focus_messages(prompt["text"], prompt_set)


# --------------------------------------------------------------------------------------------- rollouts

@contextlib.contextmanager
def lora_merged(module, enabled, restore=True):
    """Each LoRA folded into its base weight while generating: a decode step then launches far fewer kernels
    (at 2B size HF decoding is launch-bound; LoRA is about 40 % of the kernels). The base weights are copied
    before and copied back after, bit for bit: unmerging in bf16 would leave a rounding error in the frozen
    weights at every step. Sampling then sees the merged weights' rounding, not the training forward's:
    a bf16-rounding difference, as with any separate generation engine. restore=False (ZeRO-3, inside
    Runtime.gathered): the gathered weights are thrown away on leaving it and the partitions were never
    touched, so no copy (a second full set of base weights on every rank) is needed."""
    if not enabled:
        yield
        return
    from peft.tuners.lora import LoraLayer
    layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers] if restore else []
    module.merge_adapter()
    try:
        yield
    finally:
        module.unmerge_adapter()  # PEFT's merged flags reset either way
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.get_base_layer().weight.copy_(w)


@torch.no_grad()
def rollout(module, processor, prompts, images, args, n, do_sample):
    """n rollouts of each prompt, in prompt order (rollout k belongs to prompt k // n). Each prompt is encoded
    and its image run through the vision tower once; its n samples share both. A rollout: its sequences
    (one per step: the encoded prompt, the completion ids, the images and their features; zoom: one, its
    earlier turns labelled in the prompt's encoding), its text (what the rewards read: for focus and zoom the
    answer), for focus the box, for zoom its calls and turns."""
    tok = processor.tokenizer
    vision_ids = set(tok.convert_tokens_to_ids(list(common.VISION_TOKENS)))
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample, temperature=args.temperature)
    full = common.image_features(module, processor, images)
    enc = [common.encode(processor, Example(p["rec"], None, first_messages(p, args.task, args.prompt_set)), [im],
                         pixels=False)
           for p, im in zip(prompts, images)]
    if args.task == "zoom":
        convs = common.zoom_conversations(module, processor, [e for e in enc for _ in range(n)],
                                          [im for im in images for _ in range(n)], [f for f in full for _ in range(n)],
                                          args.box_format, args.max_turns, args.max_context, **gen)
        return [{"prompt": k // n, "text": c["text"], "invalid": c["invalid"], "answered": c["answered"],
                 "calls": len(c["views"]),
                 "boxes": c["boxes"], "views": c["views"], "turns": c["turns"], "max_turns_hit": c["max_turns_hit"],
                 "context_hit": c["context_hit"],
                 "seqs": [{k2: c[k2] for k2 in ("enc", "ids", "stopped", "images", "features")}]}
                for k, c in enumerate(convs)]
    results = common.generate_encoded(module, processor, [e for e in enc for _ in range(n)],
                                      features=[[f] for f in full for _ in range(n)], **gen)
    rollouts = []
    for k, res in enumerate(results):
        i = k // n
        ids, bad = common.cut_vision_tokens(res["ids"], vision_ids)
        rollouts.append({"prompt": i, "text": tok.decode(ids, skip_special_tokens=True), "invalid": bad,
                         "seqs": [{"enc": enc[i], "ids": ids, "stopped": res["stopped"] and not bad,
                                   "images": [images[i]], "features": [full[i]]}]})
    if args.task != "focus":
        return rollouts

    # Step 2 of the chain: the answer on the crop of each rollout's own box.
    todo = []
    for r in rollouts:
        r.update(box_text=r["text"], box=None, text="")
        im = images[r["prompt"]]
        w, h = im.size
        resized = common.smart_resize_hw(processor, w, h) if args.box_format == "qwen25" else None
        ended = r["seqs"][0]["stopped"] or not args.box_must_end  # as a zoom call must end to count
        r["box"] = None if r["invalid"] or not ended else common.parse_box(r["box_text"], args.box_format, w, h,
                                                                           resized)
        if r["box"] is not None:
            r["crop"] = common.crop_box(r["box"], w, h, common.token_pixels(processor))
            todo.append(r)
    if not todo:
        return rollouts
    crops = [images[r["prompt"]].crop(tuple(r["crop"])) for r in todo]
    crop_feats = common.image_features(module, processor, crops)
    examples = [Example(prompts[r["prompt"]]["rec"], None, common.answer_messages(prompts[r["prompt"]]["text"],
                                                                                  args.prompt_set), crop=r["crop"])
                for r in todo]
    enc2 = [common.encode(processor, ex, [images[r["prompt"]], c], pixels=False)
            for ex, r, c in zip(examples, todo, crops)]
    answers = common.generate_encoded(module, processor, enc2, features=[[full[r["prompt"]], f] for r, f in
                                                                         zip(todo, crop_feats)], **gen)
    for r, e, c, f, res in zip(todo, enc2, crops, crop_feats, answers):
        ids, bad = common.cut_vision_tokens(res["ids"], vision_ids)
        r["invalid"] |= bad
        r["text"] = tok.decode(ids, skip_special_tokens=True)
        r["seqs"].append({"enc": e, "ids": ids, "stopped": res["stopped"] and not bad,
                          "images": [images[r["prompt"]], c], "features": [full[r["prompt"]], f]})
    return rollouts


def score(rollouts, prompts, args):
    """Per reward function a list over rollouts, and the weighted total. A rollout whose output could not be
    used (a vision token in it, for focus an unparsable box, for zoom a conversation that never answered: its
    last turn a call) scores 0 under every function, so that the logged per-function means add up to the
    reward that was trained on."""
    completions = [r["text"] for r in rollouts]
    fields = {k: [prompts[r["prompt"]]["rec"].get(k) for r in rollouts] for k in RECORD_FIELDS}
    fields = {k: (v if any(x is not None for x in v) else None) for k, v in fields.items()}
    fields["calls"] = [r.get("calls", 0) for r in rollouts]
    usable = [not r["invalid"] and r.get("answered", True) and (args.task != "focus" or r["box"] is not None)
              for r in rollouts]
    per_fn = {name: [v if ok else 0.0 for v, ok in zip(REWARDS[name](completions, **fields, box_format=args.box_format,
                                                                      rule_metric=args.rule_metric,
                                                                      math_verify=args.math_verify), usable)]
              for name in args.rewards}
    total = [sum(w * per_fn[n][k] for n, w in zip(args.rewards, args.reward_weights)) for k in range(len(rollouts))]
    return per_fn, total


def group_advantages(rewards, scale, batch_std=None, tol=1e-6):
    """(prompts, G) rewards -> advantages: centred on the group mean, divided by the group's std (or the
    batch's: batch_std, or nothing), + 1e-4. A group whose rewards all agree (within tol) gets exactly 0."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True) if scale == "group" else \
        torch.full_like(mean, batch_std if scale == "batch" else 1.0)
    adv = (rewards - mean) / (std + (1e-4 if scale != "none" else 0.0))
    flat = (rewards.max(1, keepdim=True).values - rewards.min(1, keepdim=True).values) <= tol
    return torch.where(flat, torch.zeros_like(adv), adv), flat.squeeze(1)


# ------------------------------------------------------------------------------------------------ loss

def train_batch(seqs):
    """Prompt + completion of each sequence as one labelled example (labels: the completion, EOS included,
    and a zoom conversation's earlier model turns, already labelled in its prompt's encoding)."""
    return [common.extend_turn(None, s["enc"], s["ids"]) for s in seqs]


def sequence_logps(model, module, processor, seqs, temperature, device, reuse_features):
    """Per-token log-probs (S, T-1) and label masks of the sequences at the sampling temperature. Vision
    features: the rollout's own when the vision tower is frozen (they are what it would compute again),
    else recomputed with gradients, each distinct image once."""
    batch = common.collate(train_batch(seqs), processor.tokenizer.pad_token_id)  # no pixels: features below
    batch = common.to_device(batch, device)
    if reuse_features:
        features = [f for s in seqs for f in s["features"]]
    else:
        features = common.vision_features(module, processor, [im for s in seqs for im in s["images"]])
    return common.token_logprobs(model, batch, temperature, features=features)


def dropout_active(model):
    """Whether a training-mode forward differs from the sampling policy's: dropout layers (LoRA's among them) or
    attention dropout in the config."""
    configs = [model.config] + [getattr(model.config, k, None) for k in ("text_config", "vision_config")]
    return (any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
            or any((getattr(c, "attention_dropout", 0) or 0) > 0 for c in configs if c is not None))


def token_weights(seq_rollout, mask, aggregation, n_rollouts, n_tokens, max_tokens):
    """The weight of each sequence's tokens in the step loss, so that summing weight * per-token loss over
    every micro-batch and rank gives the chosen aggregation. seq_rollout: for each sequence, its rollout's
    index within the micro-batch (a focus rollout has two sequences); n_rollouts, n_tokens: totals over the
    optimizer step."""
    if aggregation == "token-mean":
        return torch.full((mask.shape[0],), 1.0 / max(n_tokens, 1), device=mask.device)
    if aggregation == "dr-grpo":
        return torch.full((mask.shape[0],), 1.0 / (n_rollouts * max_tokens), device=mask.device)
    per_rollout = torch.zeros(int(seq_rollout.max()) + 1, device=mask.device).index_add_(
        0, seq_rollout, mask.sum(-1).float())
    return 1.0 / (per_rollout[seq_rollout].clamp(min=1) * n_rollouts)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, weights, beta, epsilon, epsilon_high):
    """The step-loss share of these sequences (sum of weight * per-token loss) and per-token statistics.
    logp, old_logp, ref_logp: (S, T) float32; advantages, weights: (S,); mask: (S, T) bool."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp)
    if beta:
        log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)  # exp() of a bf16-sized gap overflows: SPEC trap 7
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * kl
    m = mask.float()
    loss = (per_token * m * weights[:, None]).sum()
    was_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return loss, {"kl": float((kl.detach() * m).sum()), "clipped": float((was_clipped & mask).sum())}


# ------------------------------------------------------------------------------------------------ loop

def zoom_sums(rollouts, rewards, answer_rewards, max_turns):
    """Zoom rollouts' counts, summed over this rank (zoom_metrics turns them into means): turns, zoom calls,
    rollouts whose last allowed turn was still a call (max_turns_hit) or ended at a call for want of context
    (context_hit), and the total reward and the answer reward (None: `answer` not among --rewards) by the
    number of turns taken: the answer's alone says whether looking again paid, without the tool bonus."""
    sums = {key: float(sum(r[key] for r in rollouts)) for key in ("turns", "max_turns_hit", "context_hit")}
    sums["zoom_calls"] = float(sum(r["calls"] for r in rollouts))
    for t in range(1, max_turns + 1):
        took = [k for k, r in enumerate(rollouts) if r["turns"] == t]
        sums[f"turns_{t}/rollouts"], sums[f"turns_{t}/reward"] = float(len(took)), float(sum(rewards[k] for k in took))
        if answer_rewards is not None:
            sums[f"turns_{t}/answer_reward"] = float(sum(answer_rewards[k] for k in took))
    return sums


def zoom_metrics(total, max_turns):
    n = total["rollouts"]
    out = {key: total[key] / n for key in ("turns", "zoom_calls", "max_turns_hit", "context_hit")}
    for t in range(1, max_turns + 1):
        took = total[f"turns_{t}/rollouts"]
        out[f"share_turns_{t}"] = took / n
        if took:  # the mean rewards of the rollouts that took t turns (none: no entry)
            out[f"reward_turns_{t}"] = total[f"turns_{t}/reward"] / took
            if f"turns_{t}/answer_reward" in total:
                out[f"answer_reward_turns_{t}"] = total[f"turns_{t}/answer_reward"] / took
    return out


def load_images(prompts, image_root):
    return [common.load_image(p["rec"], image_root) for p in prompts]


def gather(rt, values):
    """Every rank's list, concatenated in rank order."""
    if rt.world == 1:
        return list(values)
    parts = [None] * rt.world
    torch.distributed.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


@torch.no_grad()
def evaluate(rt, processor, prompts, args):
    """Mean rewards of one greedy rollout per held-out prompt; every rank runs all of them (ZeRO-3 keeps
    ranks in step)."""
    module = rt.module
    module.eval()
    sums, n = {}, 0
    for s in range(0, len(prompts), args.eval_batch_size):
        chunk = prompts[s:s + args.eval_batch_size]
        with rt.autocast(), rt.gathered(), lora_merged(module, args.merge_for_generation, not rt.zero3):
            rollouts = rollout(module, processor, chunk, load_images(chunk, args.image_root), args, 1, False)
        per_fn, total = score(rollouts, chunk, args)
        for name, values in per_fn.items():
            sums[f"eval_rewards/{name}"] = sums.get(f"eval_rewards/{name}", 0.0) + sum(values)
        if args.task == "zoom":
            sums["eval_zoom_calls"] = sums.get("eval_zoom_calls", 0.0) + sum(r["calls"] for r in rollouts)
        sums["eval_reward"] = sums.get("eval_reward", 0.0) + sum(total)
        n += len(rollouts)
    module.train()
    return {k: v / n for k, v in sums.items()}


def main(argv=None):
    args = parse_args(argv)
    if args.image_root is None:
        args.image_root = os.path.dirname(os.path.abspath(args.data))
    common.check_model_args(args)
    common.resolve_box_format(args)
    rt = Runtime(args, "grpo")
    processor = common.load_processor(args.model)
    prompts = read_prompts(args.data, args.image_root, args.task, args.rewards)
    eval_prompts = read_prompts(args.eval_data, args.image_root, args.task, args.rewards) if args.eval_data else []
    if args.box_format == "qwen25":  # its pixel frame is the processor's resized image
        for p in prompts + eval_prompts:
            p["rec"]["resized_hw"] = common.smart_resize_hw(processor, p["rec"]["width"], p["rec"]["height"])
    if args.task == "grounding":
        check_solution_boxes(prompts + eval_prompts, args.box_format)
    G = args.num_generations
    global_batch, steps_per_epoch, total_steps = common.step_counts(len(prompts), args, rt.world, "prompts")

    order = rt.data_order(len(prompts), global_batch)
    ckpt = common.resolve_resume(args, "grpo", total_steps, order) if args.resume else None
    common.claim_output_dir(args)  # inputs are checked: from here on this run writes to --output_dir
    log = common.MetricsLog(os.path.join(args.output_dir, "metrics.jsonl"), rt.is_main)
    samples = common.MetricsLog(os.path.join(args.output_dir, "samples.jsonl"), rt.is_main)
    model = common.load_for_training(args, ckpt)
    trainable, total = common.count_params(model)
    reuse_features = not any(p.requires_grad for n, p in model.named_parameters() if common.is_vision_param(n))
    separate_old = dropout_active(model)
    model = rt.setup(model, total_steps * args.num_iterations)
    module = rt.module
    args.merge_for_generation = args.merge_for_generation and args.finetune == "lora"
    ref_model = None
    if args.beta and args.reference == "model":
        ref_model = rt.frozen(common.load_model(args.ref_model or args.model, common.resolve_dtype(args.dtype),
                                                args.attn, adapter=None if args.ref_model else args.adapter))
    start_step = common.start_step(rt, ckpt, log, samples)
    if rt.is_main:
        print(f"grpo: task {args.task}, rewards {dict(zip(args.rewards, args.reward_weights))}, {len(prompts)} "
              f"prompts, {len(eval_prompts)} held out, {total_steps} steps of {global_batch} prompts x {G}, "
              f"{args.num_iterations} update(s) each, beta {args.beta}"
              + (f" (reference: {args.reference})" if args.beta else "")
              + f", {trainable / 1e6:.2f}M/{total / 1e6:.1f}M params trainable, world {rt.world}"
              + (f", resuming at step {start_step}" if ckpt else ""), flush=True)
    if eval_prompts and start_step == 0:
        log.write({"step": 0, **evaluate(rt, processor, eval_prompts, args)})

    steps_per_rollout = {"focus": 2, "zoom": args.max_turns}.get(args.task, 1)
    max_tokens = args.max_new_tokens * steps_per_rollout
    per_rank = args.batch_size * args.grad_accum
    bar = common.progress(range(start_step, total_steps), rt.is_main, desc="grpo", initial=start_step,
                          total=total_steps)
    t_start, reward_sum, step_reward = time.time(), 0.0, float("nan")
    for step in bar:
        t0, lr = time.time(), rt.lr()
        idx = common.step_indices(len(prompts), step, global_batch, args.seed)
        mine = idx[rt.rank * per_rank:(rt.rank + 1) * per_rank]

        # 1. Rollouts, rewards, advantages (no gradients; dropout off, as the sampling policy).
        module.eval()
        micro = []
        for m in range(args.grad_accum):
            chunk = [prompts[i] for i in mine[m * args.batch_size:(m + 1) * args.batch_size]]
            with rt.autocast(), rt.gathered(), lora_merged(module, args.merge_for_generation, not rt.zero3):
                rollouts = rollout(module, processor, chunk, load_images(chunk, args.image_root), args, G, True)
            per_fn, total_reward = score(rollouts, chunk, args)
            micro.append({"prompts": chunk, "rollouts": rollouts, "per_fn": per_fn, "reward": total_reward})
        rewards = torch.tensor([r for mb in micro for r in mb["reward"]], dtype=torch.float64).view(-1, G)
        batch_std = float(torch.tensor(gather(rt, rewards.flatten().tolist())).std()) \
            if args.scale_rewards == "batch" else None
        advantages, flat = group_advantages(rewards, args.scale_rewards, batch_std)
        advantages = advantages.flatten().float()
        for m, mb in enumerate(micro):
            n = len(mb["rollouts"])
            mb["adv"] = advantages[m * args.batch_size * G:m * args.batch_size * G + n]
            mb["seqs"] = [s for r in mb["rollouts"] for s in r["seqs"]]
            mb["seq_rollout"] = torch.tensor([k for k, r in enumerate(mb["rollouts"]) for _ in r["seqs"]])
            mb["keep"] = torch.tensor([not (args.mask_truncated and not all(s["stopped"] for s in r["seqs"]))
                                       for r in mb["rollouts"] for _ in r["seqs"]])
        # Reference log-probs, once per generation; old log-probs (the ratio's denominator when a batch is reused)
        # from the first update's own forward, the weights not moved yet, unless dropout makes it random.
        for mb in micro:
            with torch.no_grad(), rt.autocast():
                if args.num_iterations > 1 and separate_old:
                    mb["old"], _ = sequence_logps(module, module, processor, mb["seqs"], args.temperature, rt.device,
                                                  reuse_features)
                if args.beta:
                    if ref_model is not None:
                        # another checkpoint's vision tower sees the images itself; the starting model's is the
                        # policy's frozen one
                        mb["ref"], _ = sequence_logps(ref_model, ref_model, processor, mb["seqs"], args.temperature,
                                                      rt.device, reuse_features and args.ref_model is None)
                    else:
                        with module.disable_adapter():
                            mb["ref"], _ = sequence_logps(module, module, processor, mb["seqs"], args.temperature,
                                                          rt.device, reuse_features)
        module.train()
        if rt.device.type == "cuda":
            torch.cuda.synchronize()  # the reference forward is queued, not done: count it here, not in training
        t_gen = time.time() - t0

        # 2. Updates. Normalisers of the whole optimizer step: rollouts and loss tokens over micro-batches and ranks.
        n_rollouts = rt.all_sum(sum(len(mb["rollouts"]) for mb in micro))
        n_tokens = rt.all_sum(sum(common.model_tokens(s) * bool(k) for mb in micro for s, k in zip(mb["seqs"], mb["keep"])))
        sums = {}
        for _ in range(args.num_iterations):
            for m, mb in enumerate(micro):
                with rt.no_sync(m == args.grad_accum - 1), rt.autocast():
                    logp, mask = sequence_logps(model, module, processor, mb["seqs"], args.temperature, rt.device,
                                                reuse_features)
                    old = mb.setdefault("old", logp.detach())
                    mask = mask & mb["keep"].to(mask.device)[:, None]
                    seq_rollout = mb["seq_rollout"].to(logp.device)
                    weights = token_weights(seq_rollout, mask, args.loss_aggregation, n_rollouts, n_tokens, max_tokens)
                    loss, stats = grpo_loss(logp, old, mb.get("ref"), mb["adv"].to(logp.device)[seq_rollout], mask,
                                            weights, args.beta, args.epsilon, args.epsilon_high)
                    rt.backward(loss)
                common.add_sums(sums, {"loss": float(loss.detach()), "kl": stats["kl"], "clipped": stats["clipped"],
                           "tokens": float(mask.sum()), "neg_logp": float(-(logp.detach() * mask).sum())})
            grad_norm = rt.step()

        # 3. Metrics, summed over ranks.
        local = {"reward": float(rewards.sum()), "reward_sq": float((rewards ** 2).sum()),
                 "group_std": float(rewards.std(1).sum()), "groups": float(rewards.shape[0]),
                 "zero_std_groups": float(flat.sum()), "rollouts": float(rewards.numel()),
                 "completion_tokens": float(sum(common.model_tokens(s) for mb in micro for s in mb["seqs"])),
                 "truncated": float(sum(not all(s["stopped"] for s in r["seqs"]) for mb in micro
                                        for r in mb["rollouts"])),
                 "invalid": float(sum(r["invalid"] for mb in micro for r in mb["rollouts"]))}
        if args.task == "focus":
            local["unparsable_box"] = float(sum(r["box"] is None for mb in micro for r in mb["rollouts"]))
        if args.task == "zoom":
            local.update(zoom_sums([r for mb in micro for r in mb["rollouts"]],
                                   [v for mb in micro for v in mb["reward"]],
                                   [v for mb in micro for v in mb["per_fn"]["answer"]] if "answer" in args.rewards
                                   else None, args.max_turns))
        for name in args.rewards:
            values = [v for mb in micro for v in mb["per_fn"][name]]
            local[f"rewards/{name}"], local[f"rewards/{name}/sq"] = sum(values), sum(v * v for v in values)
        total = {k: rt.all_sum(v) for k, v in sorted({**local, **sums}.items())}
        n, it = total["rollouts"], args.num_iterations
        step_reward = total["reward"] / n
        reward_sum += step_reward
        metrics = {"step": step + 1, "loss": total["loss"] / it, "reward": step_reward,
                   "reward_std": math.sqrt(max(0.0, total["reward_sq"] / n - step_reward ** 2)),
                   "group_reward_std": total["group_std"] / total["groups"],
                   "frac_zero_std_groups": total["zero_std_groups"] / total["groups"]}
        for name in args.rewards:
            mean = total[f"rewards/{name}"] / n
            metrics[f"rewards/{name}/mean"] = mean
            metrics[f"rewards/{name}/std"] = math.sqrt(max(0.0, total[f"rewards/{name}/sq"] / n - mean ** 2))
        step_s = time.time() - t0
        tokens = max(total["tokens"], 1)
        metrics.update({"kl": total["kl"] / tokens, "clip_fraction": total["clipped"] / tokens,
                        # -log p of sampled tokens: an unbiased estimate of the per-token entropy at --temperature
                        "entropy": total["neg_logp"] / tokens,
                        "completion_length": total["completion_tokens"] / n, "truncated": total["truncated"] / n,
                        "invalid": total["invalid"] / n, "lr": lr, "grad_norm": grad_norm,
                        "samples_per_s": n / step_s, "generation_share": t_gen / step_s,
                        "epoch": (step + 1) / steps_per_epoch})
        if "unparsable_box" in total:
            metrics["unparsable_box"] = total["unparsable_box"] / n
        if args.task == "zoom":
            metrics.update(zoom_metrics(total, args.max_turns))
        if (step + 1) % args.log_steps == 0:
            log.write(metrics)
        if rt.is_main:
            bar.set_postfix(reward=f"{step_reward:.3f}", kl=f"{metrics['kl']:.4f}")
        if args.sample_steps and (step == 0 or (step + 1) % args.sample_steps == 0):
            mb = micro[0]  # the step's first group
            samples.write({"step": step + 1, "id": mb["prompts"][0]["rec"]["id"], "prompt": mb["prompts"][0]["text"],
                           "completions": [{"box_text": r.get("box_text"), "boxes": r.get("boxes"),
                                            "views": r.get("views"), "turns": r.get("turns"), "text": r["text"],
                                            "reward": mb["reward"][k],
                                            "advantage": float(mb["adv"][k]),
                                            "rewards": {name: mb["per_fn"][name][k] for name in args.rewards}}
                                           for k, r in enumerate(mb["rollouts"][:G])]})
        if eval_prompts and args.eval_steps and (step + 1) % args.eval_steps == 0 and step + 1 < total_steps:
            log.write({"step": step + 1, **evaluate(rt, processor, eval_prompts, args)})
        if args.save_steps and (step + 1) % args.save_steps == 0 and step + 1 < total_steps:
            common.save_checkpoint(rt, processor, args.output_dir, step + 1)
    final_eval = evaluate(rt, processor, eval_prompts, args) if eval_prompts else {}
    if final_eval:
        log.write({"step": total_steps, **final_eval})
    common.save_last(rt, processor, args.output_dir, total_steps)
    if rt.is_main:
        n = total_steps - start_step
        held = f", held-out reward {final_eval['eval_reward']:.3f}" if final_eval else ""
        print(f"grpo done: {n} steps in {time.time() - t_start:.0f}s, mean reward {reward_sum / max(1, n):.3f}, "
              f"last {step_reward:.3f}{held}, model -> {os.path.join(args.output_dir, 'final')}", flush=True)
    rt.close()


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        raise SystemExit(f"grpo.py: error: {e}") from None
