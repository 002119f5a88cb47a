"""
Stage 2 of LLaVA, visual instruction tuning: train the projector and the LLM, keep the vision tower frozen.

Starts from stage 1's result (the aligned projector, and the vision tower and LLM it names) and
trains on instruction conversations in the LLM's chat template, loss on the assistant's answers
only. Now the LLM is unfrozen: it learns to *use* the image tokens to follow instructions, answer
questions, hold a multi-turn conversation. The vision tower stays frozen, as in LLaVA-1.5.

Offline, with no arguments: continues from runs/pt on the shapes conversations, saves a complete
checkpoint to runs/sft, then answers the held-out test questions and prints the exact-match
accuracy. Real weights (see the README):
    python train_sft.py --pt runs/pt --data llava_v1_5_mix665k.json --image-folder DIR --template chatml
"""

import json
import os

import torch

import chat
import data
import train
import train_pt
from offline import standins
from tinyllava import command_line

TRAINABLE = ("projector", "llm")  # frozen: vision
# LLaVA-1.5's stage 2: lr 2e-5, no weight decay, warmup 3%, cosine, 1 epoch, batch 128, batches
# grouped by length (its group_by_modality_length: conversations with and without an image differ by
# hundreds of positions)
RECIPE = dict(lr=2e-5, weight_decay=0.0, warmup=0.03, epochs=1, batch_size=128, micro_batch_size=16,
              out_dir="runs/sft", group_by_length=True)
# offline: 2e-5 suits a large pretrained LLM; our 0.6M-parameter stand-in sees 4k conversations and
# needs a lr close to its own pretraining one (1.5e-3) to move at all (docs/results.md)
OFFLINE = dict(RECIPE, lr=1e-3, epochs=4, batch_size=32, micro_batch_size=32, eval_every=100)
OFFLINE_TEMPLATE = "chatml"  # the stand-in LLM was pretrained on chatml conversations


def main(argv=None):
    """Run the stage; returns the trained model (the tests inspect it)."""
    parser = train_pt.stage_parser(__doc__)
    parser.add_argument("--pt", default="runs/pt",
                        help="stage 1's output directory (projector + the checkpoints it names)")
    parser.add_argument("--template",
                        help="the LLM's chat template: chatml (Qwen2, SmolLM2) "
                             "or vicuna_v1 (Vicuna, Llama)")
    args = train_pt.parse_stage_args(parser, argv, recipe=RECIPE, offline_recipe=OFFLINE,
                                     is_offline=lambda a: a.data is None)
    offline = args.data is None
    if offline:
        args.data = os.path.join(standins.DATA_DIR, "instruct.json")
        args.template = args.template or OFFLINE_TEMPLATE
    elif args.template is None:
        parser.error("with your own data, give --template "
                     "(chatml or vicuna_v1, as the LLM was tuned)")
    data.get_template(args.template)  # an unknown name fails now, not after loading the models

    rank, _, device = train.init_distributed()
    torch.manual_seed(args.seed)
    model = chat.load_stage1(args.pt, device)
    model.chat["template"] = args.template
    train_pt.freeze(model, TRAINABLE)
    tokenizer = data.load_tokenizer(model.source_dir)
    log = train_pt.run_stage(model, args, tokenizer)
    if rank == 0:
        stage1 = os.path.join(args.pt, "metrics.jsonl")
        if os.path.exists(stage1):  # both stages of the run side by side
            with open(stage1) as f:
                panels = [(f"stage 1 ({args.pt})", [json.loads(line) for line in f])]
            panels.append((f"stage 2 ({args.out_dir})", log))
            train.plot_losses(panels, os.path.join(args.out_dir, "loss.png"))
        model.save_pretrained(args.out_dir)
        print(f"stage 2: model saved to {args.out_dir}")
        if offline:  # the held-out questions, then the held-out conversations (captions are long)
            chat.evaluate(args.out_dir, os.path.join(standins.DATA_DIR, "test.json"), device=device)
            chat.evaluate(args.out_dir, os.path.join(standins.DATA_DIR, "test_chat.json"), device=device,
                          out=os.path.join(args.out_dir, "answers_chat.jsonl"), max_new_tokens=64)
    return model


if __name__ == "__main__":
    command_line(main)
