"""
Stage 1 of LLaVA, feature alignment ("pretraining"): train the projector only.

The vision tower and the LLM are frozen. On image-caption pairs in the `plain` template
(<image> caption <eos>, loss on the caption only) the projector learns to turn patch features into
vectors the frozen LLM reads as a description of the image. Freezing the LLM is the point: the only
way left to lower the loss is to map images *into the LLM's existing embedding space*, and the LLM's
language skills are not disturbed by short, noisy captions.

This file also holds what both LLaVA stages share (train_sft.py imports it): the loss, the freezing
policy, the data sets and the command line around the generic loop of train.py.

Offline, with no arguments: makes the shapes data set and the stage-0 stand-ins if missing, trains,
saves runs/pt, and prints captions of a few held-out images.
Real weights (see the README):
    python train_pt.py --vision DIR --llm DIR --data blip_laion_cc_sbu_558k.json --image-folder DIR
"""

import argparse
import os
from dataclasses import asdict, replace
from functools import partial

import torch

import chat
import data
import train
from offline import standins
from tinyllava import (
    IGNORE_INDEX,
    InputError,
    TinyLlava,
    add_lora,
    command_line,
    parameter_table,
    save_safetensors,
    state_dict_for_save,
    write_json,
)

TRAINABLE = ("projector",)  # frozen: vision, llm
TEMPLATE = "plain"
# LLaVA-1.5's stage 1: lr 1e-3, no weight decay, warmup 3%, cosine, 1 epoch, batch 256
RECIPE = dict(lr=1e-3, weight_decay=0.0, warmup=0.03, epochs=1, batch_size=256, micro_batch_size=32,
              out_dir="runs/pt")
# offline: 3,500 captions is ~1/160 of LLaVA's 558k, so several epochs with a smaller batch (more
# steps) and a higher lr, chosen on the held-out caption loss (docs/results.md)
OFFLINE = dict(RECIPE, lr=1e-2, epochs=6, batch_size=32, eval_every=100)


def main(argv=None):
    """Run the stage; returns the trained model (the tests inspect it)."""
    parser = stage_parser(__doc__)
    parser.add_argument("--vision",
                        help="CLIP / SigLIP checkpoint directory (default: the offline stand-in)")
    parser.add_argument("--llm",
                        help="Llama / Qwen2 checkpoint directory (default: the offline stand-in)")
    parser.add_argument("--projector", default="mlp2x_gelu", choices=["mlp2x_gelu", "linear"])
    args = parse_stage_args(parser, argv, recipe=RECIPE, offline_recipe=OFFLINE,
                            is_offline=lambda a: a.vision is None and a.llm is None)
    offline = args.vision is None and args.llm is None
    if None in (args.vision, args.llm, args.data) and not offline:
        parser.error("with real weights, give --vision, --llm and --data")
    rank, _, device = train.init_distributed()
    if offline:  # under torchrun, the processes train the stand-ins together
        args.data = args.data or os.path.join(train.first_process_first(standins.ensure_shapes),
                                              "captions.json")
        args.vision, args.llm = standins.ensure_standins(seed=args.seed, progress=args.progress)
    torch.manual_seed(args.seed)  # the projector's initialisation
    model = TinyLlava.from_parts(args.vision, args.llm, args.projector, device=device)
    model.chat = asdict(data.ChatConfig(TEMPLATE, image_settings(args.vision)))
    freeze(model, TRAINABLE)
    tokenizer = data.load_tokenizer(args.llm)
    run_stage(model, args, tokenizer)
    if rank == 0:
        save_projector(model, args.out_dir)
        print(f"stage 1: projector saved to {args.out_dir}")
        if offline:
            show_captions(model, tokenizer, os.path.join(os.path.dirname(args.data), "test.json"))
    return model


def show_captions(model, tokenizer, test_file, n=6):
    """Caption a few held-out images: after stage 1 the frozen LLM should already describe them."""
    samples = data.load_samples(test_file)[:n]
    folder = os.path.dirname(test_file)
    image = data.ChatConfig.from_dict(model.chat).image
    prompt = data.build_prompt([{"from": "human", "value": data.IMAGE_TAG}], tokenizer, TEMPLATE)
    pixels = torch.stack([data.load_image(os.path.join(folder, s["image"]), image)
                          for s in samples])
    model.eval()
    stop = chat.stop_ids(model, tokenizer, TEMPLATE)
    captions = chat.answer_batch(model, tokenizer, [prompt] * len(samples), pixel_values=pixels,
                                 stop=stop, max_new_tokens=48)
    print("captions of held-out images after stage 1:")
    for s, c in zip(samples, captions):
        print(f"  {s['image']}: {c}")


# -----------------------------------------------------------------------------
# What both LLaVA stages share: freezing, the loss, the data sets, the command line


def freeze(model, trainable_parts, lora=None):
    """requires_grad=True exactly for the named parts of a TinyLlava ("vision", "projector", "llm"),
    then print the table that shows it. lora: tinyllava.add_lora's settings (r, alpha, dropout,
    targets), to train LoRA adapters beside the frozen LLM instead of the LLM itself."""
    parts = {"vision": model.vision_tower, "projector": model.multi_modal_projector,
             "llm": model.language_model}
    unknown = set(trainable_parts) - parts.keys()
    if unknown:
        raise InputError(f"unknown parts {sorted(unknown)}; parts are {sorted(parts)}")
    for name, part in parts.items():
        part.requires_grad_(name in trainable_parts)
    if lora:
        add_lora(model.language_model, **lora)
    print(parameter_table(model))


def llava_loss(model, batch):
    """LLaVA batches from data.collate: next-token loss on the answer tokens (labels != -100),
    summed, with the number of targets and of positions (image tokens included)."""
    _, loss = model(batch["input_ids"], pixel_values=batch["pixel_values"],
                    attention_mask=batch["attention_mask"], labels=batch["labels"],
                    return_logits=False)
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # the targets the loss averaged over
    n_images = 0 if batch["pixel_values"] is None else batch["pixel_values"].size(0)
    image_tokens = train.unwrap(model).vision_tower.num_tokens
    tokens = batch["attention_mask"].sum() + n_images * (image_tokens - 1)
    return loss * n, n, tokens


def stage_parser(doc):
    """The flags both stages take; each script adds its own sources (--vision/--llm or --pt)."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data",
                        help="LLaVA-format JSON/JSONL file "
                             "(default: the shapes data set, made if missing)")
    parser.add_argument("--image-folder",
                        help="folder the samples' image paths are relative to "
                             "(default: the data file's)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="max positions per sample, image patches included "
                             "(default: the LLM's context)")
    parser.add_argument("--cache-dir", default=os.path.join("runs", "cache"), type=lambda d: d or None,
                        help="where the tokenized data set is kept for the next run with the same data "
                             "('' for nowhere)")
    parser.add_argument("--eval-frac", type=float, default=0.02,
                        help="fraction of the data held out for the eval loss")
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=False,
                        help="batch samples of similar length together: less padding "
                             "(as LLaVA-1.5 groups them)")
    train.add_train_args(parser)
    return parser


def parse_stage_args(parser, argv, recipe, offline_recipe, is_offline):
    """Parse with the stage's defaults: the published recipe for real weights, the offline one
    otherwise. Flags given on the command line win over both."""
    parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    if is_offline(args):
        parser.set_defaults(**offline_recipe)
        args = parser.parse_args(argv)
    return args


def image_settings(vision_dir):
    """How images are prepared for this vision tower: its processor's size, mean and std, and
    LLaVA-1.5's 'pad'."""
    return replace(data.load_image_processor_config(vision_dir), mode="pad")


def llava_datasets(model, args, tokenizer):
    """(train, eval) ConversationDatasets for `model`, talked to as model.chat says.
    Every round(1 / eval_frac)-th sample is held out for the eval loss."""
    if not 0 <= args.eval_frac <= 0.5:
        raise InputError(f"--eval-frac {args.eval_frac}: the share held out must be between 0 and 0.5")
    settings = data.ChatConfig.from_dict(model.chat)
    context = args.max_len or model.language_model.config.max_position_embeddings
    # the data path counts the image placeholder as one id; the model makes it num_tokens positions
    def dataset():
        return data.ConversationDataset(args.data, tokenizer, settings.template, settings.image,
                                        image_folder=args.image_folder,
                                        max_len=context - model.vision_tower.num_tokens + 1,
                                        cache_dir=args.cache_dir)

    # with a cache, the first process of each machine tokenizes, the others load its arrays
    full = dataset() if args.cache_dir is None else train.first_process_first(dataset)
    k = round(1 / args.eval_frac) if args.eval_frac > 0 else len(full) + 1
    held = [i for i in range(len(full)) if i % k == k - 1]
    kept = [i for i in range(len(full)) if i % k != k - 1]
    return torch.utils.data.Subset(full, kept), torch.utils.data.Subset(full, held)


def run_stage(model, args, tokenizer):
    """Train a TinyLlava whose trainable parts are already chosen; returns the metrics log."""
    train_set, eval_set = llava_datasets(model, args, tokenizer)
    print(f"{args.data}: {len(train_set)} training samples, "
          f"{len(eval_set)} held out for the eval loss")
    full, has_image = train_set.dataset, train_set.dataset.has_image
    lengths = None
    if args.group_by_length:  # positions in the LLM: the image placeholder stands for num_tokens of them
        extra = model.vision_tower.num_tokens - 1
        lengths = [int(full.lengths[i]) + (extra if has_image[i] else 0) for i in train_set.indices]
    collate = partial(data.collate, pad_id=tokenizer.pad_id)
    # a micro-batch of text-only conversations gives the projector (and a trained vision tower) no
    # gradient
    text_only = not all(has_image[i] for i in train_set.indices)
    return train.train(model, train_set, collate_fn=collate, loss_fn=llava_loss,
                       cfg=train.train_config(args), eval_set=eval_set, lengths=lengths,
                       unused=text_only)


def save_projector(model, path):
    """Stage 1's result: the projector's weights, and a config.json naming the vision tower and LLM
    it was trained against (a projector means nothing without the two spaces it maps between)."""
    os.makedirs(path, exist_ok=True)
    write_json(os.path.join(path, "config.json"), model.config)
    state = state_dict_for_save(model)
    tensors = {k: v for k, v in state.items() if k.startswith("multi_modal_projector.")}
    save_safetensors(tensors, os.path.join(path, chat.PROJECTOR_FILE))


if __name__ == "__main__":
    command_line(main)
