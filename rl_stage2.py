"""VisRL stage 2 (SPEC 4.5): DPO on both steps at once,

    L = lambda_B * DPO(box pair | image + focus prompt) + lambda_R * DPO(answer pair | image + answer prompt + crop)

where both answers are scored with the crop of the CHOSEN box (DPO needs one prompt for the two responses).
The loss, reference handling and loop are rl_stage1.py's, which implements the joint objective; this entry
point sets VisRL's stage-2 weights, --box_weight 0.5 --answer_weight 0.5 (both flags still accepted).

    python rl_stage2.py --model runs/rl1_merged --data runs/pairs.jsonl --image_root imgs --output_dir runs/rl2
"""
import common
import rl_stage1

if __name__ == "__main__":
    try:
        rl_stage1.run(stage="rl_stage2", box_weight=0.5, answer_weight=0.5)
    except common.DataError as e:
        raise SystemExit(f"rl_stage2.py: error: {e}") from None
