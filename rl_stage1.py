"""VisRL preference training, written out: DPO on the focus step (stage 1, SPEC 4.4), and with an answer
term the step-level joint loss of stage 2 (SPEC 4.5; rl_stage2.py runs this script with its weights):

    L = box_weight * DPO(chosen box text, rejected box text | image + focus prompt)
      + answer_weight * DPO(chosen answer, rejected answer | image + answer prompt + crop of the CHOSEN box)

    DPO (sigmoid) = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

with log-probabilities summed over the response tokens (and EOS), in float32. Other losses: --loss ipo
(token-averaged log-ratios), hinge, robust; --label_smoothing with sigmoid is conservative DPO; --sft_weight
adds the chosen responses' token NLL. Defaults are VisRL's: beta 0.1, lr 5e-6, 5 epochs, LoRA.

    python rl_stage1.py --model runs/sft_merged --data runs/pairs.jsonl --image_root imgs --output_dir runs/rl1
    deepspeed --num_gpus 8 rl_stage1.py --deepspeed configs/zero2.json ...   |   torchrun --nproc_per_node 8 ...

Reference (--reference): `precomputed` (default) computes ref log-probs once, before the first update, with
the model the stage starts from, and keeps them with the data (OUT/reference_logps.jsonl): training runs one
model, and 5 epochs do not pay 5 reference passes. `model` runs a frozen copy (--ref_model, default the
starting model) next to the policy. `adapter_disabled` uses the policy with its LoRA switched off: right
only when the stage starts from a merged checkpoint (a new adapter on it); with --adapter it would be the
base, not the model the stage starts from, and is refused.

Each distinct image goes through the vision tower once per micro-batch: the full image serves the chosen
and rejected sequences (and, in stage 2, both answers), the crop both answers.
"""
import hashlib
import math
import os
import time

import torch
import torch.nn.functional as F

import common
from common import Example, Runtime

LOSSES = ("sigmoid", "ipo", "hinge", "robust")
KINDS = ("box", "answer")


def parse_args(argv=None, **stage_defaults):
    parser = common.ArgumentParser(__doc__)
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="pairs from filter_pairs.py (JSONL)")
    g.add_argument("--image_root", default=None, help="image root (default: the data file's directory)")
    g.add_argument("--eval_data", default=None, help="held-out pairs (default: --eval_fraction of --data)")
    g.add_argument("--eval_fraction", type=common.bounded(float, 0, 1, open_high=True), default=0.05,
                   help="pairs held out when --eval_data is not given")
    g.add_argument("--eval_steps", type=common.COUNT, default=0,
                   help="evaluate every N steps (0: at the start and end)")
    g.add_argument("--prompt_set", default="visrl", choices=sorted(common.PROMPT_SETS), help="prompt wording")
    g.add_argument("--cutoff_len", type=common.POSITIVE_INT, default=4096,
                   help="longest sequence; longer pairs are skipped")
    d = parser.add_argument_group("preference loss")
    d.add_argument("--loss", default="sigmoid", choices=LOSSES, help="DPO loss")
    d.add_argument("--beta", type=common.POSITIVE, default=0.1, help="DPO beta (IPO: its tau)")
    d.add_argument("--label_smoothing", type=common.bounded(float, 0, 0.5, open_high=True), default=0.0,
                   help="sigmoid: conservative DPO's label noise; robust: its epsilon")
    d.add_argument("--sft_weight", type=common.NONNEGATIVE, default=0.0,
                   help="weight of the chosen responses' token NLL")
    d.add_argument("--box_weight", type=common.NONNEGATIVE, default=1.0,
                   help="lambda_B: weight of the focus-step DPO term")
    d.add_argument("--answer_weight", type=common.NONNEGATIVE, default=0.0,
                   help="lambda_R: weight of the answer-step DPO term")
    d.add_argument("--preference_eos", default="include", choices=["include", "exclude"],
                   help="the end-of-turn token in the preference's log-probs: include (VisRL, LLaMA-Factory, TRL) "
                        "or exclude (kept in the chosen NLL): README, DPO stage 2")
    d.add_argument("--reference", default="precomputed", choices=["precomputed", "model", "adapter_disabled"],
                   help="where reference log-probs come from")
    d.add_argument("--ref_model", default=None, help="--reference model: its directory (default: the starting model)")
    common.add_model_args(parser)
    common.add_finetune_args(parser)
    common.add_runtime_args(parser)
    parser.set_defaults(lr=5e-6, epochs=5.0, **stage_defaults)
    args = parser.parse_args(argv)
    if args.reference == "adapter_disabled" and (args.adapter or args.finetune != "lora"):
        parser.error("--reference adapter_disabled with " + ("--adapter: the adapter-disabled model is the base, not "
                     "the model this stage starts from. Merge the adapter first (merge.py) and start from the "
                     "merged checkpoint" if args.adapter else "full fine-tuning: there is no adapter to disable"))
    if args.box_weight + args.answer_weight == 0:
        parser.error("--box_weight and --answer_weight must not both be 0")
    return args


# ------------------------------------------------------------------------------------------------ loss

def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, loss="sigmoid",
             beta=0.1, label_smoothing=0.0):
    """Per-pair preference losses and implicit rewards from summed sequence log-probs (float32)."""
    policy_chosen, policy_rejected = policy_chosen.float(), policy_rejected.float()
    chosen_logratio = policy_chosen - ref_chosen.float()
    rejected_logratio = policy_rejected - ref_rejected.float()
    delta = chosen_logratio - rejected_logratio
    if loss == "sigmoid":  # label_smoothing > 0: conservative DPO (the label is wrong with that probability)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss == "robust":  # unbiased under label noise epsilon (Chowdhury et al. 2024)
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss == "ipo":  # log-ratios averaged over tokens, so the squared target does not scale with length
        avg = chosen_logratio / n_chosen.clamp(min=1) - rejected_logratio / n_rejected.clamp(min=1)
        losses = (avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss {loss!r}")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


# ------------------------------------------------------------------------------------------------ data

def read_pairs(path, image_root, processor, args, need_answers):
    """Pairs as units: (pair, kind) with the chosen/rejected Examples of that step. A pair whose rejected
    answer is missing (its box did not parse) gives no answer unit; one too long is skipped, counted. Ids are
    unique (each keys its reference log-probs), every image is decoded and checked (common.check_images), and
    the chosen crop lies inside it, before any model work."""
    pairs, seen = [], {}
    for lineno, p in common.input_rows(path, "pairs"):
        where = f"{path}:{lineno}"
        for key in ("id", "image", "question", "chosen_box_text", "rejected_box_text"):
            if not isinstance(p.get(key), str) or not p[key].strip():
                raise common.DataError(f"{where}: field '{key}' must be a non-empty string (a filter_pairs.py line)")
        for key in ("chosen_answer", "rejected_answer"):  # null: that side's box did not parse (no answer unit)
            if p.get(key) is not None and not isinstance(p[key], str):
                raise common.DataError(f"{where}: field '{key}' must be a string or null, got {p[key]!r}")
        if p["chosen_box_text"].strip() == p["rejected_box_text"].strip():
            raise common.DataError(f"{where}: chosen_box_text and rejected_box_text are the same box: the pair "
                                   "prefers nothing")
        common.check_unique(seen, p["id"], where)
        pairs.append((where, p))
    units, skipped = [], {"too_long": 0, "no_answer_pair": 0}
    for (where, p), (w, h) in zip(pairs, common.check_images([p for _, p in pairs], image_root)):
        kinds = ["box"] if args.box_weight > 0 else []
        if need_answers:
            if isinstance(p.get("chosen_answer"), str) and isinstance(p.get("rejected_answer"), str) \
                    and p.get("chosen_crop"):
                common.check_box(p["chosen_crop"], f"{where}: chosen_crop", w, h)
                kinds.append("answer")
            else:
                skipped["no_answer_pair"] += 1
        for kind in kinds:
            if kind == "box":
                messages, crop = common.focus_messages(p["question"], args.prompt_set), None
                responses = p["chosen_box_text"], p["rejected_box_text"]
            else:
                messages, crop = common.answer_messages(p["question"], args.prompt_set), p["chosen_crop"]
                responses = p["chosen_answer"], p["rejected_answer"]
            try:
                chosen, rejected = (Example(p, image_root, messages, r, crop=crop) for r in responses)
            except common.DataError as e:
                raise common.DataError(f"{where}: {e}") from None
            chosen.n_labels = len(processor.tokenizer(chosen.response, add_special_tokens=False)["input_ids"]) + 1
            n = max(common.estimate_tokens(processor, ex, w, h) for ex in (chosen, rejected))
            if n > args.cutoff_len:
                skipped["too_long"] += 1
                continue
            units.append({"key": f"{p['id']}/{kind}", "kind": kind, "pair": p, "chosen": chosen,
                          "rejected": rejected})
    if need_answers and pairs and skipped["no_answer_pair"] == len(pairs):
        raise common.DataError(f"{path}: no pair has chosen_answer, rejected_answer and chosen_crop: an answer "
                               "stage would train on the boxes alone (filter_pairs.py writes them)")
    return units, skipped


def unit_batch(units, processor, module):
    """Chosen and rejected sequences of some units in one padded batch (chosen, rejected, chosen, ...), and
    the vision features of each sequence's images, each distinct image (a full image, a crop) encoded once."""
    images, index, per_unit, encoded = [], {}, [], []
    for u in units:
        seq_images = u["chosen"].images(full=common.load_image(u["pair"], u["chosen"].image_root))
        keys = [u["pair"]["image"], ("crop", u["pair"]["image"], tuple(u["chosen"].crop or ()))][:len(seq_images)]
        for key, im in zip(keys, seq_images):
            if key not in index:
                index[key] = len(images)
                images.append(im)
        per_unit.append([index[k] for k in keys])
        encoded += [common.encode(processor, ex, seq_images, pixels=False) for ex in (u["chosen"], u["rejected"])]
    features = common.vision_features(module, processor, images)
    return common.collate(encoded, processor.tokenizer.pad_token_id), \
        [features[i] for ids in per_unit for _ in range(2) for i in ids]


def sequence_logps(model, module, processor, units, device):
    """Per-token log-probs and label masks of every unit's chosen and rejected response (rows alternate)."""
    batch, features = unit_batch(units, processor, module)
    return common.token_logprobs(model, common.to_device(batch, device), features=features)


def preference_sums(logp, mask, eos):
    """Each response's summed log-prob as the preference sees it. eos "exclude" leaves out its last labelled
    token, the end of turn: both responses end with it, and on short answers DPO widened its margin by
    lowering P(end of turn | rejected word) until the model stopped ending its answers after that word."""
    if eos == "include":
        return logp.sum(-1)
    last = mask & ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return logp.masked_fill(last, 0).sum(-1)


# ------------------------------------------------------------------------------------------- reference

@torch.no_grad()
def precompute_reference(rt, model, processor, units, args, resuming):
    """Reference log-probs of every unit, from the model as the stage starts (before any update, dropout
    off), appended to OUT/reference_logps.jsonl batch by batch: a kill during this pass loses one batch.
    Each rank computes its share; ranks run the same number of forwards (ZeRO-3 needs them in step)."""
    path = os.path.join(args.output_dir, "reference_logps.jsonl")
    common.check_made_by(path[:-len(".jsonl")] + ".made_by.json", {
        **common.model_stamp(args), "data": rt.order["data"],  # the hash data_order took of --data
        "eval_data": common.file_fingerprint(args.eval_data) if args.eval_data else None,
        "prompt_set": args.prompt_set, "preference_eos": args.preference_eos,
        # what else moves the numbers: the images read, and the precision and attention they were computed in
        "image_root": os.path.abspath(args.image_root), "dtype": args.dtype, "attn": args.attn})
    rt.barrier()
    cache = {row["key"]: row for row in common.resume_jsonl(path)} if os.path.exists(path) else {}
    todo = [u for u in units if u["key"] not in cache]
    if todo and resuming:
        raise common.DataError(f"{path} lacks {len(todo)} reference log-probs, and the weights have been trained "
                               "since: they can no longer be computed. Restart the stage without --resume.")
    per_rank = math.ceil(len(todo) / rt.world)
    mine = todo[rt.rank * per_rank:(rt.rank + 1) * per_rank]
    n_batches = math.ceil(per_rank / args.batch_size)
    model.eval()
    with open(path, "a", encoding="utf-8") if rt.is_main else open(os.devnull, "w") as out:
        for b in common.progress(range(n_batches), rt.is_main and n_batches > 0, desc="reference", unit="batch"):
            chunk = mine[b * args.batch_size:(b + 1) * args.batch_size] or todo[:1]  # padding keeps ranks in step
            with rt.autocast():  # the policy's forward precision, so that the first step's log-ratio is 0
                logp, mask = sequence_logps(model, rt.module, processor, chunk, rt.device)
            sums = preference_sums(logp, mask, args.preference_eos).tolist()
            rows = [{"key": u["key"], "chosen": sums[2 * i], "rejected": sums[2 * i + 1]} for i, u in enumerate(chunk)]
            if rt.world > 1:
                gathered = [None] * rt.world
                torch.distributed.all_gather_object(gathered, rows)
                rows = [r for part in gathered for r in part]
            rows = [r for r in rows if r["key"] not in cache]
            for r in rows:
                cache[r["key"]] = r
            if rt.is_main:
                common.append_jsonl(out, rows)
    model.train()
    return cache


# ------------------------------------------------------------------------------------------------ loop

def split_eval(pairs_units, args):
    """Held-out pairs: --eval_data, else a stable --eval_fraction of pair ids (by hash, not by position)."""
    if args.eval_data or args.eval_fraction <= 0:
        return pairs_units, []
    def held(u):
        return int(hashlib.sha256(u["pair"]["id"].encode()).hexdigest(), 16) % 10000 < args.eval_fraction * 1e4
    return [u for u in pairs_units if not held(u)], [u for u in pairs_units if held(u)]


def group_by_pair(units):
    groups = {}
    for u in units:
        groups.setdefault(u["pair"]["id"], []).append(u)
    return list(groups.values())


def preference_terms(rt, model, processor, units, ref, args, ref_model=None):
    """Per-unit DPO losses, rewards and log-probs of a micro-batch, and the chosen responses' token NLL sum."""
    logp, mask = sequence_logps(model, rt.module, processor, units, rt.device)
    sums = preference_sums(logp, mask, args.preference_eos)
    counts = mask.sum(-1).float() - int(args.preference_eos == "exclude")  # the tokens in the sums (IPO's mean)
    if args.reference == "precomputed":
        ref_c = torch.tensor([ref[u["key"]]["chosen"] for u in units], device=sums.device)
        ref_r = torch.tensor([ref[u["key"]]["rejected"] for u in units], device=sums.device)
    else:
        with torch.no_grad():
            if args.reference == "model":
                ref_logp, ref_mask = sequence_logps(ref_model, ref_model, processor, units, rt.device)
            else:  # the policy with its adapter switched off: the merged checkpoint the stage started from
                with rt.module.disable_adapter():
                    ref_logp, ref_mask = sequence_logps(model, rt.module, processor, units, rt.device)
            ref_sums = preference_sums(ref_logp, ref_mask, args.preference_eos)
            ref_c, ref_r = ref_sums[0::2], ref_sums[1::2]
    losses, reward_c, reward_r = dpo_loss(sums[0::2], sums[1::2], ref_c, ref_r, counts[0::2], counts[1::2],
                                          args.loss, args.beta, args.label_smoothing)
    return {"losses": losses, "reward_chosen": reward_c, "reward_rejected": reward_r,
            "logp_chosen": sums[0::2].detach(), "logp_rejected": sums[1::2].detach(),
            "chosen_nll": -logp[0::2].sum()}


def metric_sums(units, t):
    """Sums per step kind, to be added over micro-batches and ranks and divided by the counts. Every kind's
    keys, zeros where a micro-batch has none of it: ranks all-reduce them one by one, so they must all hold
    the same keys (a rank without answer pairs skipping theirs hung the next collective)."""
    out = {}
    for kind in KINDS:
        sel = torch.tensor([u["kind"] == kind for u in units], device=t["losses"].device)
        out.update({f"{kind}/n": float(sel.sum()), f"{kind}/loss": float(t["losses"][sel].detach().sum()),
                    f"{kind}/reward_chosen": float(t["reward_chosen"][sel].sum()),
                    f"{kind}/reward_rejected": float(t["reward_rejected"][sel].sum()),
                    f"{kind}/accuracy": float((t["reward_chosen"][sel] > t["reward_rejected"][sel]).sum()),
                    f"{kind}/margin_sq": float(((t["reward_chosen"][sel] - t["reward_rejected"][sel]) ** 2).sum()),
                    f"{kind}/logp_chosen": float(t["logp_chosen"][sel].sum()),
                    f"{kind}/logp_rejected": float(t["logp_rejected"][sel].sum())})
    return out


def finish_metrics(sums, prefix=""):
    """Means per kind, the margin and its standard error, and the weighted total loss the step optimised."""
    out = {}
    for kind in KINDS:
        n = sums.get(f"{kind}/n", 0)
        if n:
            for name in ("loss", "reward_chosen", "reward_rejected", "accuracy", "logp_chosen", "logp_rejected"):
                out[f"{prefix}{kind}/{name}"] = sums[f"{kind}/{name}"] / n
            chosen, rejected = out[f"{prefix}{kind}/reward_chosen"], out[f"{prefix}{kind}/reward_rejected"]
            out[f"{prefix}{kind}/margin"] = margin = chosen - rejected
            # the margin's standard error over these pairs (0 for one pair): is a held-out margin more than noise?
            variance = max(sums[f"{kind}/margin_sq"] / n - margin ** 2, 0.0)
            out[f"{prefix}{kind}/margin_se"] = math.sqrt(variance / (n - 1)) if n > 1 else 0.0
    return out


@torch.no_grad()
def evaluate(rt, model, processor, units, ref, args, ref_model):
    """Preference metrics on held-out pairs; every rank runs all of them (ranks stay in step under ZeRO-3)."""
    model.eval()
    sums = {}
    for s in range(0, len(units), args.batch_size):
        chunk = units[s:s + args.batch_size]
        with rt.autocast():
            terms = preference_terms(rt, model, processor, chunk, ref, args, ref_model)
        common.add_sums(sums, metric_sums(chunk, terms))
    model.train()
    return finish_metrics(sums, "eval_")


def run(argv=None, stage="rl_stage1", **stage_defaults):
    args = parse_args(argv, **stage_defaults)
    if args.image_root is None:
        args.image_root = os.path.dirname(os.path.abspath(args.data))
    common.check_model_args(args)
    rt = Runtime(args, stage)
    processor = common.load_processor(args.model)
    need_answers = args.answer_weight > 0
    units, skipped = read_pairs(args.data, args.image_root, processor, args, need_answers)
    train_units, eval_units = split_eval(units, args)
    if args.eval_data:
        eval_units, _ = read_pairs(args.eval_data, args.image_root, processor, args, need_answers)
        shared = sorted({u["pair"]["id"] for u in eval_units} & {u["pair"]["id"] for u in train_units})
        if shared:  # each id keys one row of reference log-probs
            raise common.DataError(f"{args.eval_data}: pair id {shared[0]!r} is also in {args.data} "
                                   f"({len(shared)} shared ids); held-out pairs need ids of their own")
    pairs = group_by_pair(train_units)
    global_batch, steps_per_epoch, total_steps = common.step_counts(len(pairs), args, rt.world, "training pairs")

    order = rt.data_order(len(pairs), global_batch)
    ckpt = common.resolve_resume(args, stage, total_steps, order) if args.resume else None
    common.claim_output_dir(args)  # inputs are checked: from here on this run writes to --output_dir
    log = common.MetricsLog(os.path.join(args.output_dir, "metrics.jsonl"), rt.is_main)
    model = common.load_for_training(args, ckpt)
    dtype = common.resolve_dtype(args.dtype)
    trainable, total = common.count_params(model)
    model = rt.setup(model, total_steps)
    ref_model = None
    if args.reference == "model":
        ref_model = rt.frozen(common.load_model(args.ref_model or args.model, dtype, args.attn,
                                                adapter=None if args.ref_model else args.adapter))
    ref = precompute_reference(rt, model, processor, train_units + eval_units, args, bool(ckpt)) \
        if args.reference == "precomputed" else None
    start_step = common.start_step(rt, ckpt, log)
    if rt.is_main:
        n_kind = {k: sum(u["kind"] == k for u in train_units) for k in KINDS}
        print(f"{stage}: {len(pairs)} training pairs ({n_kind}), {len(group_by_pair(eval_units))} held out, skipped "
              f"{skipped}, {total_steps} steps of {global_batch} pairs, {trainable / 1e6:.2f}M/{total / 1e6:.1f}M "
              f"params trainable, reference {args.reference}, world {rt.world}"
              + (f", resuming at step {start_step}" if ckpt else ""), flush=True)

    per_rank = args.batch_size * args.grad_accum
    weight = {"box": args.box_weight, "answer": args.answer_weight}
    if eval_units and start_step == 0:
        log.write({"step": 0, **evaluate(rt, model, processor, eval_units, ref, args, ref_model)})
    model.train()
    meter = common.Throughput()
    bar = common.progress(range(start_step, total_steps), rt.is_main, desc=stage, initial=start_step,
                          total=total_steps)
    t0, loss_sum, step_loss = time.time(), 0.0, float("nan")
    for step in bar:
        lr = rt.lr()
        idx = common.step_indices(len(pairs), step, global_batch, args.seed)
        step_units = [u for i in idx for u in pairs[i]]
        # Normalisers of the whole global step: units per kind, and chosen tokens for the SFT term.
        n_kind = {k: sum(u["kind"] == k for u in step_units) for k in KINDS}
        n_chosen_tokens = sum(u["chosen"].n_labels or 0 for u in step_units) or 1
        mine = idx[rt.rank * per_rank:(rt.rank + 1) * per_rank]
        sums = {}
        for m in range(args.grad_accum):
            units = [u for i in mine[m * args.batch_size:(m + 1) * args.batch_size] for u in pairs[i]]
            with rt.no_sync(m == args.grad_accum - 1), rt.autocast():
                t = preference_terms(rt, model, processor, units, ref, args, ref_model)
                w = torch.tensor([weight[u["kind"]] / n_kind[u["kind"]] for u in units], device=t["losses"].device)
                loss = (w * t["losses"]).sum()
                if args.sft_weight:
                    loss = loss + args.sft_weight * t["chosen_nll"] / n_chosen_tokens
                rt.backward(loss)
            common.add_sums(sums, metric_sums(units, t))
            sums["chosen_nll"] = sums.get("chosen_nll", 0.0) + float(t["chosen_nll"].detach())
            meter.add(len(mine[m * args.batch_size:(m + 1) * args.batch_size]), 0)
        grad_norm = rt.step()
        sums = {k: rt.all_sum(v) for k, v in sorted(sums.items())}
        metrics = finish_metrics(sums)
        step_loss = sum(weight[k] * metrics[f"{k}/loss"] for k in KINDS if f"{k}/loss" in metrics)
        if args.sft_weight:  # the optimised loss includes the SFT term: log both
            metrics["sft_nll"] = sums["chosen_nll"] / n_chosen_tokens
            step_loss += args.sft_weight * metrics["sft_nll"]
        loss_sum += step_loss
        if rt.is_main:
            bar.set_postfix(loss=f"{step_loss:.4f}")
        if (step + 1) % args.log_steps == 0:
            log.write({"step": step + 1, "loss": step_loss, **metrics, "lr": lr, "grad_norm": grad_norm,
                       "pairs_per_s": meter.rates()["samples_per_s"] * rt.world, "epoch": (step + 1) / steps_per_epoch})
        if eval_units and args.eval_steps and (step + 1) % args.eval_steps == 0 and step + 1 < total_steps:
            log.write({"step": step + 1, **evaluate(rt, model, processor, eval_units, ref, args, ref_model)})
        if args.save_steps and (step + 1) % args.save_steps == 0 and step + 1 < total_steps:
            common.save_checkpoint(rt, processor, args.output_dir, step + 1)
    final_eval = evaluate(rt, model, processor, eval_units, ref, args, ref_model) if eval_units else {}
    if final_eval:
        log.write({"step": total_steps, **final_eval})
    common.save_last(rt, processor, args.output_dir, total_steps)
    if rt.is_main:
        n = total_steps - start_step
        acc = {k: round(v, 3) for k, v in final_eval.items() if k.endswith("accuracy")}
        print(f"{stage} done: {n} steps in {time.time() - t0:.0f}s, mean loss {loss_sum / max(1, n):.4f}, "
              f"last {step_loss:.4f}, held-out {acc}, model -> {os.path.join(args.output_dir, 'final')}", flush=True)
    rt.close()


if __name__ == "__main__":
    try:
        run()
    except common.DataError as e:
        raise SystemExit(f"rl_stage1.py: error: {e}") from None
