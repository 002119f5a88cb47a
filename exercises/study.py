"""
The studies of the research exercises, run on the offline pipeline: stage 2 variants, each measured
the same way.

    python train_pt.py                       # once: stage 0 and stage 1 (runs/pt)
    python exercises/study.py recipe         # stage 2 as train_sft.py runs it: the baseline
    python exercises/study.py skip-stage1    # exercise 9: stage 2 from a fresh projector
    python exercises/study.py lora --rank 8  # exercise 10: LoRA on the LLM, not full fine-tuning
    python exercises/study.py lora --rank 64 --targets q_proj k_proj v_proj o_proj
    python exercises/study.py patches36      # exercise 8: a vision stand-in with 8-px patches (6x6)
    python exercises/study.py pool2x2        # exercise 8: the same, your 2x2 pooling first

Each variant trains stage 2 with train_sft.py's offline settings (same data, same seed), then
reports the held-out exact match per question type, exercise 9's image gap on the held-out questions
(the loss with each sample's own image, and with another sample's), the trainable parameters and the
time per step. A row is appended to runs/study/results.jsonl. Exercise 8's two variants need their
own stage 1, on their own vision stand-in (8-px patches: 2x2 per grid cell, trained once into
runs/study/vision-p8), so they run it first, with train_pt.py's offline settings; pool2x2 turns the
36 patches back into 9 tokens, one per cell. The exercise functions come from your files, or from
solutions/ with --solutions. Stage-2 training flags (--epochs, --lr, ...) pass through, e.g. to
train a skipped stage 1 longer.
"""

import json
import os
import sys
import time
from dataclasses import asdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root
from checks import EXERCISES, load_function  # noqa: E402
from checks.c08_pooled_projector import PooledProjector  # noqa: E402
from checks.c10_lora import merge_lora  # noqa: E402

import chat  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
import train_pt  # noqa: E402
import train_sft  # noqa: E402
from offline import standins  # noqa: E402
from tinyllava import TinyLlava, command_line, parameter_table, read_config  # noqa: E402

OUT = "runs/study"
POOLING = ("patches36", "pool2x2")  # exercise 8's variants


def pooling_stage1(variant, args, device):
    """Exercise 8: stage 1 on the 8-px vision stand-in, the projector alone behind the student's
    pooling or not."""
    vision = os.path.join(OUT, "vision-p8", "vision")
    if not os.path.exists(os.path.join(vision, "model.safetensors")):
        # 8 epochs, as exercise 8's measured outcomes were (the pipeline's 16-px stand-in trains 24)
        standins.train_vision(standins.DATA_DIR, os.path.dirname(vision), device, patch_size=8,
                              epochs=8, progress=args.progress)
    llm = read_config(args.pt)["tinyllava_sources"]["llm"]  # the same LLM stand-in as the others
    torch.manual_seed(args.seed)
    model = TinyLlava.from_parts(vision, llm, "mlp2x_gelu", device=device)
    if variant == "pool2x2":
        pool = load_function(EXERCISES[8], args.solutions)
        projector = PooledProjector(pool, model.vision_tower.config.hidden_size,
                                    model.language_model.config.hidden_size)
        model.multi_modal_projector = projector.to(device)
    model.chat = asdict(data.ChatConfig(train_pt.TEMPLATE, train_pt.image_settings(vision)))
    train_pt.freeze(model, train_pt.TRAINABLE)
    pt_args = train_pt.parse_stage_args(train_pt.stage_parser(""), [], train_pt.RECIPE,
                                        train_pt.OFFLINE, lambda a: True)
    pt_args.data = os.path.join(standins.DATA_DIR, "captions.json")
    pt_args.out_dir, pt_args.progress = os.path.join(args.out_dir, "pt"), args.progress
    t0 = time.time()
    log = train_pt.run_stage(model, pt_args, data.load_tokenizer(llm))
    return model, dict(stage1_seconds_per_step=(time.time() - t0) / len(log),
                       stage1_eval_loss=log[-1].get("eval_loss"))


def build(variant, args, device):
    """The model stage 2 starts from, with its trainable parameters chosen; and what its own stage 1
    measured."""
    stage1 = {}
    if variant in POOLING:
        model, stage1 = pooling_stage1(variant, args, device)
    elif variant == "skip-stage1":
        # exactly what stage 1 started from (same sources, projector and seed), minus its training
        pt = read_config(args.pt)
        torch.manual_seed(args.seed)
        sources = pt["tinyllava_sources"]
        model = TinyLlava.from_parts(sources["vision"], sources["llm"], pt["projector_type"],
                                     device=device)
        model.chat = dict(pt["tinyllava_chat"])
    else:
        model = chat.load_stage1(args.pt, device)
    model.chat["template"] = train_sft.OFFLINE_TEMPLATE
    if variant == "lora":
        train_pt.freeze(model, ("projector",))
        add_lora = load_function(EXERCISES[10], args.solutions)
        add_lora(model.language_model, rank=args.rank, alpha=2 * args.rank,
                 targets=tuple(args.targets))
        print(parameter_table(model))
    else:
        train_pt.freeze(model, train_sft.TRAINABLE)
    return model, stage1


def held_out_gap(model, tokenizer, test_file, image_gap):
    """Exercise 9's probe on the held-out questions, all of them in one batch."""
    settings = data.ChatConfig.from_dict(model.chat)
    ds = data.ConversationDataset(test_file, tokenizer, settings.template, settings.image)
    batch = data.collate([ds[i] for i in range(len(ds))], tokenizer.pad_id)
    batch = train.to_device(batch, next(model.parameters()).device)
    return image_gap(model, batch)


def main(argv=None):
    parser = train_pt.stage_parser(__doc__)
    parser.add_argument("variant", choices=["recipe", "skip-stage1", "lora", *POOLING])
    parser.add_argument("--pt", default="runs/pt", help="stage 1's output (train_pt.py)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"],
                        help="LoRA'd projections of every attention layer")
    parser.add_argument("--solutions", action="store_true",
                        help="use the reference functions in exercises/solutions/")
    args = train_pt.parse_stage_args(parser, argv, train_sft.RECIPE, train_sft.OFFLINE,
                                     lambda a: True)
    name = args.variant
    if args.variant == "lora":
        name += f"-r{args.rank}-{'+'.join(t.removesuffix('_proj') for t in args.targets)}"
    args.data = os.path.join(standins.DATA_DIR, "instruct.json")
    args.out_dir = os.path.join(OUT, name)
    test_file = os.path.join(standins.DATA_DIR, "test.json")
    _, _, device = train.init_distributed()

    model, stage1 = build(args.variant, args, device)
    tokenizer = data.load_tokenizer(model.source_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.time()
    log = train_pt.run_stage(model, args, tokenizer)
    seconds = time.time() - t0
    steps = len(log)
    merge_lora(model.language_model)  # a plain LLM again
    # a pooled projector has no checkpoint format
    if not isinstance(model.multi_modal_projector, PooledProjector):
        model.save_pretrained(args.out_dir)
    model.eval()
    settings = data.ChatConfig.from_dict(model.chat)
    size = settings.image.size
    with torch.no_grad():
        image_tokens = model.encode_images(torch.zeros(1, 3, size, size, device=device)).shape[1]
    t0 = time.time()
    accuracy = chat.evaluate_model(model, tokenizer, settings, test_file,
                                   os.path.join(args.out_dir, "answers.jsonl"))
    eval_seconds = time.time() - t0
    image_gap = load_function(EXERCISES[9], args.solutions)
    own, shuffled = held_out_gap(model, tokenizer, test_file, image_gap)
    print(f"image gap on the held-out questions: loss {own:.3f} with their own images, "
          f"{shuffled:.3f} with another's")
    row = dict(variant=name, accuracy=accuracy, loss_own_image=own, loss_other_image=shuffled,
               trainable=trainable, image_tokens=image_tokens, steps=steps,
               seconds_per_step=seconds / max(1, steps), eval_seconds=eval_seconds,
               **stage1, epochs=args.epochs, lr=args.lr,
               first_losses=[round(r["loss"], 3) for r in log[:5]], final_loss=log[-1]["loss"],
               final_eval_loss=log[-1].get("eval_loss"))
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    command_line(main)
