"""Build the toy world: tiny random Qwen2-VL / Qwen2.5-VL (and, --families, Qwen3-VL / Qwen3.5)
checkpoints and a synthetic grounded-VQA dataset.

    python tools/make_toy.py --out toy [--seed 0]

writes
    toy/qwen2-vl/, toy/qwen2.5-vl/   model directories (config, safetensors, tokenizer, image processor,
                                     chat template), loadable with from_pretrained like a real checkpoint
    toy/data/train.jsonl             box-annotated records (id, image, question, answer, bbox, width, height,
                                     objects): SFT's data
    toy/data/questions.jsonl         question-answer records without a box: the RL stages' data
    toy/data/test.jsonl              held-out records with the target's box (evaluation)
    toy/data/target_boxes.json       every record's target box, for diagnostics only (no stage reads it)
    toy/data/images/*.png

The scene (README "The toy world"): a 224x168 image on a 4x3 grid of 56-pixel cells; the target, a 16-pixel
shape in one of four colours, and 0-2 dark grey distractor shapes (a circle, square or triangle as the target,
or with --distractors unnamed, pipeline.sh's world, a cross or a ring: shapes no answer names), each centred
in its cell on a pale tile whose tint says which cell it is (the tiny model reads position off the tint).
"What shape is the red object?" The processor shows the model the full image at half resolution (max_pixels =
112 x 84: 12 vision tokens, a shape 8 pixels wide) and a crop at least 28 pixels wide upscaled to 56 (the shape
32 pixels wide; the Qwen3 families' toys: 32 and 64, at 128 x 96): the detail is in the crop, so the answer
depends on where the model looks.

The regime (the papers' premises): box annotations are few and do not say where the answer is (in a scene
with distractors, a training record's box is any of its objects, as from an annotator who boxed something in
the picture without reading the question: --train_boxes any), while questions with answers and no box are
plentiful. SFT learns to find objects and read crops; only the answers tell which object matters.

The model: 2.0 M parameters, weights drawn with std 0.08 (HF's default 0.02 leaves a from-scratch model on
a long loss plateau here), rope_theta 10 and mrope_section [2, 7, 7] (more angular resolution for image rows
and columns), and a 1000-token byte-level BPE trained on the prompts, with digits one per token as Qwen2's.
"""
import json
import os
import random
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")  # five made SFT's crop reading slower and the table no clearer
UNNAMED = ("cross", "ring")  # distractor shapes no answer names (--distractors unnamed)
WIDTH, HEIGHT = 224, 168
GRID_COLS, GRID_ROWS = 4, 3  # 56-pixel cells: one merged vision token each in the half-resolution view
OBJECT = 16  # pixels: 8 in the full view, 32 in the upscaled crop of its box
DISTRACTOR = (60, 60, 60)  # distractors are dark grey: only the target has a colour
BACKGROUND = (128, 128, 128)
INIT_STD = 0.08

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's own chat template (as shipped with Qwen/Qwen2-VL-7B-Instruct).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IMAGE_PROCESSOR = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "min_pixels": 56 * 56, "max_pixels": 112 * 84, "patch_size": 14,
                   "temporal_patch_size": 2, "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}


def draw_shape(draw, shape, box, colour):
    x1, y1, x2, y2 = box
    if shape == "cross":  # a distractor no question names (--distractors unnamed)
        t = (x2 - x1) // 4
        draw.rectangle([x1, (y1 + y2) // 2 - t // 2 - 1, x2 - 1, (y1 + y2) // 2 + t // 2], fill=colour)
        draw.rectangle([(x1 + x2) // 2 - t // 2 - 1, y1, (x1 + x2) // 2 + t // 2, y2 - 1], fill=colour)
    elif shape == "ring":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], outline=colour, width=3)
    elif shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    else:  # triangle
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour)


def cell_tint(col, row):
    """The tint of a cell's tile: red channel by column, green by row, so a vision token's content says where
    it is (M-RoPE positions alone were not read out by the tiny model in 1500 steps, when this world was
    designed)."""
    return (240 - 30 * col, 240 - 40 * row, 200)


def make_scene(rng, image_path, max_objects, distractors="named"):
    """Draw the target (a random colour) and 0..max_objects-1 grey distractors, each in its own cell on its
    cell's tile; returns [(colour, shape, box)], the target first."""
    n = rng.randint(1, max_objects)
    cells = rng.sample(range(GRID_COLS * GRID_ROWS), n)
    colours = [rng.choice(list(COLOURS))] + ["grey"] * (n - 1)
    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = WIDTH // GRID_COLS, HEIGHT // GRID_ROWS
    objects = []
    for cell, colour in zip(cells, colours):
        col, row = cell % GRID_COLS, cell // GRID_COLS
        draw.rectangle([col * cell_w, row * cell_h, (col + 1) * cell_w - 1, (row + 1) * cell_h - 1],
                       fill=cell_tint(col, row))
        # Coarse placement: centred in its cell, one size, so the box text is one of 12 (SPEC 8: free
        # placement does not learn at this model size on a CPU budget).
        x, y = col * cell_w + (cell_w - OBJECT) // 2, row * cell_h + (cell_h - OBJECT) // 2
        box = [x, y, x + OBJECT, y + OBJECT]
        shape = rng.choice(SHAPES if colour != "grey" or distractors == "named" else UNNAMED)
        draw_shape(draw, shape, box, COLOURS.get(colour, DISTRACTOR))
        objects.append((colour, shape, box))
    image.save(image_path)
    return objects


def make_record(rng, index, split, image_dir, max_objects, boxes, distractors="named"):
    """One image and the question about its target. boxes: "target" (its box), "any" (the box of an object
    drawn uniformly from the scene: an annotator who boxed something in the picture without reading the
    question) or None (no box)."""
    name = f"{split}_{index:05d}.png"
    objects = make_scene(rng, os.path.join(image_dir, name), max_objects, distractors)
    colour, shape, box = objects[0]
    rec = {"id": f"{split}-{index}", "image": f"images/{name}", "question": f"What shape is the {colour} object?",
           "answer": shape, "width": WIDTH, "height": HEIGHT, "dataset": "toy", "objects": len(objects)}
    if boxes == "target":
        rec["bbox"] = box
    elif boxes == "any":
        rec["bbox"] = objects[rng.randrange(len(objects))][2]
    return rec, box


def tokenizer_corpus():
    """Text the toy tokenizer is trained on: every word and digit pattern the stages can emit."""
    words = list(COLOURS) + list(SHAPES) + [f"What shape is the {c} object?" for c in COLOURS] + [
             "Please provide the bounding box "
             "coordinate of the region that can help you answer the question better.", "Please first provide "
             "the bounding box coordinate of the region, then refer to the corresponding sub-image to answer "
             "the question better.", "Please answer the question based on the original image and local detail "
             "image.", "You are a helpful assistant.", "system user assistant", '{"bbox_2d": [12, 34, 56, 78]}',
             "[0.125, 0.5, 0.75, 1.0] (12,345),(678,999) score: 0.8 {\"score\": 1}", "<think> </think> <answer> "
             "</answer> Position Confidence yes no"]
    return words * 20 + [" ".join(str(i) for i in range(100))]


def build_tokenizer(out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one per token, as Qwen2's pre-tokenizer does; byte-level for everything else.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=32768)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


# The tiny models, one entry per family: each keeps its family's real structure at toy size (Qwen2.5-VL's
# windowed vision attention; Qwen3-VL's 16-pixel patches, DeepStack layer and interleaved M-RoPE; Qwen3.5's
# linear-attention layers next to full-attention ones, its partial rotary embedding). Every vision tower
# ends in 128 = the language model's width; a merged vision token covers 28 pixels (Qwen2) or 32 (Qwen3).
ROPE = {"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 7, 7]}
QWEN3_IMAGE = {"patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "min_pixels": 64 * 64,
               "max_pixels": 128 * 96}  # half resolution again: 4 x 3 merged tokens of 32 pixels
QWEN3_VISION = dict(depth=2, hidden_size=128, out_hidden_size=128, intermediate_size=256, num_heads=4,
                    patch_size=16, num_position_embeddings=64)
MODELS = {
    "qwen2-vl": dict(model_type="qwen2_vl", processor="Qwen2VLProcessor", text={}, image={},
                     # The ViT width is embed_dim; hidden_size is the merger's output and must equal the LM's.
                     vision=dict(depth=2, embed_dim=128, hidden_size=128, num_heads=4, mlp_ratio=4)),
    "qwen2.5-vl": dict(model_type="qwen2_5_vl", processor="Qwen2_5_VLProcessor", text={}, image={},
                       vision=dict(depth=2, hidden_size=128, out_hidden_size=128, intermediate_size=256,
                                   num_heads=4, window_size=56, fullatt_block_indexes=[1])),
    "qwen3-vl": dict(model_type="qwen3_vl", processor="Qwen3VLProcessor", image=QWEN3_IMAGE,
                     vision=dict(QWEN3_VISION, deepstack_visual_indexes=[0]),
                     text=dict(head_dim=32, rope_parameters=dict(ROPE, mrope_interleaved=True))),
    "qwen3.5": dict(model_type="qwen3_5", processor="Qwen3VLProcessor", image=QWEN3_IMAGE, vision=QWEN3_VISION,
                    text=dict(head_dim=32, layer_types=["linear_attention", "full_attention"] * 2,
                              linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
                              linear_num_value_heads=4,
                              rope_parameters=dict(ROPE, mrope_section=[2, 3, 3], mrope_interleaved=True,
                                                   partial_rotary_factor=0.5))),
}


def build_model(name, out_dir, tokenizer, seed, image=None):
    """The tiny model of family `name`; `image`: processor settings over the family's (another world's sizes)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    spec = MODELS[name]
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text = dict(dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_parameters=ROPE,
                     bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                     pad_token_id=ids["<|endoftext|>"], initializer_range=INIT_STD), **spec["text"])
    config = AutoConfig.for_model(spec["model_type"], text_config=text,
                                  vision_config=dict(spec["vision"], initializer_range=INIT_STD),
                                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                  vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
                                  initializer_range=INIT_STD)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(dict(IMAGE_PROCESSOR, **spec["image"], **(image or {}), processor_class=spec["processor"]), f,
                  indent=2)
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n / 1e6:.2f} M parameters -> {out_dir}")


def main():
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("--out", required=True, help="directory to write the toy world into")
    parser.add_argument("--seed", type=common.SEED, default=0, help="seed for weights, images and questions")
    parser.add_argument("--n_train", type=common.COUNT, default=1000, help="box-annotated training records (SFT)")
    parser.add_argument("--n_questions", type=common.COUNT, default=2000, help="training questions without boxes (RL)")
    parser.add_argument("--n_test", type=common.COUNT, default=1000, help="held-out records with the target's box")
    parser.add_argument("--max_objects", type=common.bounded(int, 1, GRID_COLS * GRID_ROWS), default=3,
                        help="objects per image, drawn uniformly from 1..N: the target and N-1 grey distractors")
    parser.add_argument("--train_boxes", default="any", choices=["any", "target"],
                        help="the training box: any object of the scene (default: boxes that do not say where "
                             "the answer is) or the target's")
    parser.add_argument("--distractors", default="named", choices=["named", "unnamed"],
                        help="the distractors' shapes: those the questions ask about, or others (cross, ring)")
    parser.add_argument("--families", "--family", default="qwen2-vl,qwen2.5-vl",
                        help=f"tiny models to build, comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--skip_models", action="store_true", help="write only the dataset")
    args = parser.parse_args()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file, not a directory")
    families = args.families.split(",")
    if not set(families) <= set(MODELS):
        parser.error(f"--families takes names from {', '.join(MODELS)}, got {args.families!r}")

    data_dir = os.path.join(args.out, "data")
    image_dir = os.path.join(data_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = random.Random(args.seed)
    targets = {}
    for split, n, boxes in (("train", args.n_train, args.train_boxes), ("questions", args.n_questions, None),
                            ("test", args.n_test, "target")):
        with open(os.path.join(data_dir, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                rec, targets[f"{split}-{i}"] = make_record(rng, i, split, image_dir, args.max_objects, boxes,
                                                           args.distractors)
                f.write(json.dumps(rec) + "\n")
    # The targets' boxes of every record, for diagnostics (how often a stage's boxes land on the target);
    # no stage reads this file.
    with open(os.path.join(data_dir, "target_boxes.json"), "w") as f:
        json.dump(targets, f)
    print(f"data: {args.n_train} annotated ({args.train_boxes} object's box) / {args.n_questions} box-free / "
          f"{args.n_test} test records -> {data_dir}")
    if args.skip_models:
        return
    tokenizer = None
    for name in families:  # one tokenizer, trained once, for every model
        out_dir = os.path.join(args.out, name)
        os.makedirs(out_dir, exist_ok=True)
        tokenizer = tokenizer or build_tokenizer(out_dir)
        build_model(name, out_dir, tokenizer, args.seed)


if __name__ == "__main__":
    main()
