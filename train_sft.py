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
With --lora-r R the LLM stays frozen and rank-R adapters train beside it (saved alone in
adapters.safetensors, and merged into the saved model); --projector-lr gives the projector its own lr;
--train-vision (with --vision-lr) trains the vision tower too.
"""

import json
import os

import torch

import chat
import data
import train
import train_pt
from offline import standins
from tinyllava import LORA_TARGETS, command_line, lora_state, merge_lora, save_safetensors, write_json

TRAINABLE = ("projector", "llm")  # frozen: vision (the default; see trainable_parts)
ADAPTERS_FILE = "adapters.safetensors"  # with --lora-r: the adapters alone, beside the merged model
# LLaVA-1.5's stage 2: lr 2e-5, no weight decay, warmup 3%, cosine, 1 epoch, batch 128, batches
# grouped by length (its group_by_modality_length: conversations with and without an image differ by
# hundreds of positions)
RECIPE = dict(lr=2e-5, weight_decay=0.0, warmup=0.03, epochs=1, batch_size=128, micro_batch_size=16,
              out_dir="runs/sft", group_by_length=True)
# offline: 2e-5 suits a large pretrained LLM; our 0.6M-parameter stand-in sees 8k conversations and
# needs a lr close to its own pretraining one (2e-3) to move at all (docs/results.md)
OFFLINE = dict(RECIPE, lr=1e-3, epochs=3, batch_size=32, micro_batch_size=32, eval_every=100)
OFFLINE_TEMPLATE = "chatml"  # the stand-in LLM was pretrained on chatml conversations


def main(argv=None):
    """Run the stage; returns the trained model (the tests inspect it)."""
    parser = train_pt.stage_parser(__doc__)
    parser.add_argument("--pt", default="runs/pt",
                        help="stage 1's output directory (projector + the checkpoints it names)")
    parser.add_argument("--template",
                        help="the LLM's chat template: chatml (Qwen2, SmolLM2) "
                             "or vicuna_v1 (Vicuna, Llama)")
    g = parser.add_argument_group("what trains, at which lr")
    g.add_argument("--lora-r", type=int, default=0,
                   help="train rank-R LoRA adapters beside the frozen LLM instead of the LLM (0 = the LLM)")
    g.add_argument("--lora-alpha", type=float, help="the adapters' scale is alpha / r (default: 2 r)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default: 0.05)")
    g.add_argument("--lora-targets", nargs="+", metavar="NAME",
                   help="the decoder projections that get adapters (default: all of attention and MLP)")
    g.add_argument("--projector-lr", type=float, help="the projector's peak lr (default: --lr)")
    g.add_argument("--train-vision", action="store_true", help="train the vision tower too")
    g.add_argument("--vision-lr", type=float, help="its peak lr with --train-vision (default: --lr / 5)")
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
    if args.vision_lr is not None and not args.train_vision:
        parser.error("--vision-lr needs --train-vision")
    lora_flags = [f for f, v in (("--lora-alpha", args.lora_alpha), ("--lora-dropout", args.lora_dropout),
                                 ("--lora-targets", args.lora_targets)) if v is not None]
    if lora_flags and args.lora_r <= 0:
        parser.error(f"{', '.join(lora_flags)}: only with --lora-r (the adapters' rank)")
    if args.lora_r < 0 or not 0 <= (args.lora_dropout or 0) < 1:
        parser.error(f"--lora-r {args.lora_r}, --lora-dropout {args.lora_dropout}: "
                     "the rank is at least 0, the dropout in [0, 1)")
    trainable, lora = trainable_parts(args)
    args.part_lrs = {prefix: lr for prefix, lr in (("multi_modal_projector.", args.projector_lr),
                                                   ("vision_tower.", args.vision_lr)) if lr is not None}

    rank, _, device = train.init_distributed()
    torch.manual_seed(args.seed)
    model = chat.load_stage1(args.pt, device)
    model.chat["template"] = args.template
    train_pt.freeze(model, trainable, lora=lora)
    tokenizer = data.load_tokenizer(model.source_dir)
    log = train_pt.run_stage(model, args, tokenizer)
    if rank == 0:
        if lora:  # the adapters alone, then merged into the weights: an ordinary checkpoint
            os.makedirs(args.out_dir, exist_ok=True)
            save_safetensors(lora_state(model.language_model), os.path.join(args.out_dir, ADAPTERS_FILE))
            write_json(os.path.join(args.out_dir, "adapter_config.json"), lora)
            merge_lora(model)
        stage1 = os.path.join(args.pt, "metrics.jsonl")
        if os.path.exists(stage1):  # both stages of the run side by side
            with open(stage1) as f:
                panels = [(f"stage 1 ({args.pt})", [json.loads(line) for line in f])]
            panels.append((f"stage 2 ({args.out_dir})", log))
            train.plot_losses(panels, os.path.join(args.out_dir, "loss.png"))
        chat.save_checkpoint(model, args.out_dir)
        print(f"stage 2: model saved to {args.out_dir}")
        if offline:  # the held-out questions, then the held-out conversations (captions are long)
            chat.evaluate(args.out_dir, os.path.join(standins.DATA_DIR, "test.json"), device=device)
            chat.evaluate(args.out_dir, os.path.join(standins.DATA_DIR, "test_chat.json"), device=device,
                          out=os.path.join(args.out_dir, "answers_chat.jsonl"), max_new_tokens=64)
    return model


def trainable_parts(args):
    """(the parts stage 2 trains, add_lora's settings or None): LLaVA-1.5's projector and LLM; with
    --lora-r, adapters in place of the LLM (LLaVA's --lora_enable); with --train-vision, the vision
    tower too (LLaVA-OneVision, at a lower lr)."""
    parts = [p for p in TRAINABLE if not (p == "llm" and args.lora_r)] + ["vision"] * args.train_vision
    if args.vision_lr is None and args.train_vision:
        args.vision_lr = args.lr / 5  # OneVision: 2e-6 for the tower beside 1e-5
    lora = None
    if args.lora_r:
        alpha = 2 * args.lora_r if args.lora_alpha is None else args.lora_alpha  # LLaVA: r 128, alpha 256
        dropout = 0.05 if args.lora_dropout is None else args.lora_dropout  # LLaVA's
        targets = list(args.lora_targets or LORA_TARGETS)
        lora = dict(r=args.lora_r, alpha=alpha, dropout=dropout, targets=targets)
    return parts, lora


if __name__ == "__main__":
    command_line(main)
