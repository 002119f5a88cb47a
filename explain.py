"""
Seeing inside a trained tinyllava: which words its image tokens became, where each answer token looked
in the image, and how sure it was. Pictures drawn with pillow, a short summary printed.

    python explain.py image --model runs/sft --image data/shapes/images/03600.png \
        --prompt "Where is the red circle?" --prompt "What color is the square?" [--out explain]
    python explain.py share --model runs/pt [--data data/shapes] [--split test]
    python explain.py look --model runs/sft [--data data/shapes/test.json]

`image` writes into --out:
  words.png     the image as the model saw it, cut into its patches, each labelled with the vocabulary
                words whose input embeddings are nearest (cosine) to the patch's projected token: what
                the LLM reads there if it reads it as a word. Stage 1 is meant to make these right.
  answer_K.png  the K-th prompt's answer, token by token: the token's probability and runners-up, and
                its attention over the patches in each layer (heads averaged), with the share of its
                attention that goes to the image at all. Patches that draw attention under every prompt
                are framed: such "sinks" soak up attention whatever is asked, so they say nothing about
                where the answer came from. Give two prompts or more to find them.
`share` counts, on the shapes data, the grid cells whose nearest words name what is in them (the
colour, the shape, or "empty"), for the model and for a random projector in its place; `look`, on its
held-out position questions, which queries attend to the asked object's cell: the question's words or
the answer's.

--model is stage 2's checkpoint (runs/sft) or stage 1's output (runs/pt), whose projector alone made
the image tokens.
"""

import argparse
import contextlib
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import chat
import data
from offline import shapes
from tinyllava import IMAGE_TOKEN_INDEX, InputError, Projector, command_line

# -----------------------------------------------------------------------------
# Image tokens as words


def nearest(tokens, vocab, k):
    """(cosines, ids), each (..., k): for each vector of tokens (..., D), the k rows of vocab (V, D)
    nearest to it by cosine, nearest first. Cosine, not distance or dot product: every decoder layer
    reads its input through an RMSNorm, which divides the length out, so the first layer sees an image
    token and a word alike when they point the same way."""
    cos = F.normalize(tokens.float(), dim=-1) @ F.normalize(vocab.float(), dim=-1).T  # (..., V)
    return cos.topk(k, dim=-1)


@torch.no_grad()
def nearest_words(model, pixel_values, n_vocab, k=3):
    """nearest() for the image tokens (n_img, N, D) of pixel_values, among the first n_vocab rows of
    the LLM's input embeddings (the tokenizer's; a checkpoint may pad the table with unused rows)."""
    vocab = model.language_model.model.embed_tokens.weight[:n_vocab]  # (V, D)
    return nearest(model.encode_images(pixel_values), vocab, k)


def label(text):
    """A token's text as a label: without surrounding spaces, or its repr when that leaves nothing."""
    return text.strip() or repr(text)


def word(tokenizer, i):
    return label(tokenizer.decode([i]))


def patch_words(model, tokenizer, pixel_values, k=3):
    """Per image, per patch: its k nearest *distinct* words [(word, cosine)], nearest first. A word
    often has two tokens (" red" inside a sentence, "red" at its start): they count once."""
    cos, ids = nearest_words(model, pixel_values, tokenizer.vocab_size, 4 * k)  # room for duplicates
    out = []
    for image_cos, image_ids in zip(cos.tolist(), ids.tolist()):
        out.append([])
        for cs, patch in zip(image_cos, image_ids):
            words = {}
            for c, i in zip(cs, patch):
                words.setdefault(word(tokenizer, i), c)
            out[-1].append(list(words.items())[:k])
    return out


def grid_side(model):
    """Patches per side of the square grid the image tokens come from."""
    n = model.vision_tower.num_tokens
    side = math.isqrt(n)
    if side * side != n:
        raise InputError(f"{n} image tokens are not a square grid of patches (a CLS token among "
                         "them?): explain draws patch grids only")
    return side


@torch.no_grad()
def word_share(model, tokenizer, data_dir, split="test", k=3, batch_size=64):
    """On the shapes data: how often the k nearest words of a 3x3 grid cell's patches name what is in
    the cell, over the images of `split` in meta.json -> {"color", "shape": shares of the cells with
    an object whose colour / shape (or the shape's plural) is among their words; "empty": share of the
    empty cells with "empty" among theirs; "all": share of all cells named right (colour and shape, or
    empty); "cells": how many cells were counted; "length": the image tokens' mean length in units of
    a word's (the input embeddings' mean length)}. The words are nearest by direction alone; a layer
    reads its input through an RMSNorm, but in the residual stream a long token drowns what the layers
    add to it (docs/results.md)."""
    with open(os.path.join(data_dir, "meta.json")) as f:
        images = [m for m in json.load(f)["images"] if m["split"] == split]
    if not images:
        raise InputError(f"{data_dir}/meta.json: no images of split {split!r}")
    settings = data.ChatConfig.from_dict(model.chat).image
    cells, device = shapes.patch_cells(grid_side(model)), model.language_model.lm_head.weight.device
    hits, lengths = dict(color=[], shape=[], empty=[], all=[]), []
    for j in range(0, len(images), batch_size):
        batch = images[j : j + batch_size]
        files = [os.path.join(data_dir, m["image"]) for m in batch]
        pixels = torch.stack([data.load_image(file, settings) for file in files]).to(device)
        lengths.append(model.encode_images(pixels).float().norm(dim=-1).flatten())  # (n_img * N,)
        for m, patches in zip(batch, patch_words(model, tokenizer, pixels, k)):
            named = [set() for _ in range(9)]  # the words each cell's patches are nearest to
            for cell, words in zip(cells, patches):
                named[cell] |= {w.lower() for w, _ in words}
            objects = {o["cell"]: o for o in m["objects"]}
            for cell, words in enumerate(named):
                if cell in objects:
                    o = objects[cell]
                    color, shape = o["color"] in words, bool({o["shape"], o["shape"] + "s"} & words)
                    hits["color"].append(color)
                    hits["shape"].append(shape)
                    hits["all"].append(color and shape)
                else:
                    hits["empty"].append("empty" in words)
                    hits["all"].append("empty" in words)
    vocab = model.language_model.model.embed_tokens.weight[:tokenizer.vocab_size].float()  # (V, D)
    length = torch.cat(lengths).mean() / vocab.norm(dim=-1).mean()
    return ({name: sum(h) / max(1, len(h)) for name, h in hits.items()}
            | {"cells": len(hits["all"]), "length": length.item()})


@contextlib.contextmanager
def random_projector(model, seed=0):
    """The model with a freshly initialised projector in place of its own, as a new LLaVA has before
    stage 1: the baseline that a trained projector's nearest words are compared with."""
    trained = model.multi_modal_projector
    with torch.random.fork_rng(devices=[]), torch.device(trained.linear_1.weight.device):
        torch.manual_seed(seed)  # the caller's random stream stays as it was
        model.multi_modal_projector = Projector(trained.kind, trained.linear_1.in_features,
                                                trained.linear_1.out_features,
                                                bias=trained.linear_1.bias is not None)
    try:
        yield model
    finally:
        model.multi_modal_projector = trained

# -----------------------------------------------------------------------------
# Where the answer looks, and how sure it is


@dataclass
class Answer:
    """One greedy answer, explained token by token."""
    question: str
    text: str  # the answer
    tokens: list  # its tokens, as labels (surrounding spaces stripped)
    probs: list  # the probability of each (greedy: the most likely token)
    alternatives: list  # per token, the runners-up [(text, probability)]
    layers: list  # the decoder layers whose attention was kept
    # (n_layers, n_tokens, S): what the query that chose each answer token attended to, heads averaged
    attention: torch.Tensor
    image: range  # the image tokens' positions among the S

    @property
    def on_image(self):
        """(n_layers, n_tokens) share of each query's attention that goes to the image tokens."""
        return self.attention[..., self.image].sum(-1)

    @property
    def focus(self):
        """(N,) how each patch shares the image attention, averaged over the layers and tokens shown."""
        a = self.attention[..., self.image]
        return (a / a.sum(-1, keepdim=True).clamp(min=1e-12)).mean((0, 1))


@contextlib.contextmanager
def keeping_attention(model, layers):
    """Within the block the given decoder layers attend explicitly and keep their weights."""
    attns = [model.language_model.model.layers[i].self_attn for i in layers]
    for a in attns:
        a.keep_attention = True
    try:
        yield attns
    finally:
        for a in attns:
            a.keep_attention, a.attention = False, None


@torch.no_grad()
def explain_answer(model, tokenizer, settings, pixel_values, question, layers, max_new_tokens=16,
                   top=3):
    """Answer `question` about one image (3, H, W) greedily, as chat does; then run the prompt and the
    answer once more, attending explicitly in `layers`, to read each answer token's probability, its
    `top` runners-up, and where the query that chose it looked -> Answer."""
    device = model.language_model.lm_head.weight.device
    stop = chat.stop_ids(model, tokenizer, settings.template)
    turns = [{"from": "human", "value": data.image_first(question)}]
    prompt = data.build_prompt(turns, tokenizer, settings.template)
    pixels = pixel_values[None].to(device)
    new = model.generate(torch.tensor([prompt], device=device), pixels, max_new_tokens=max_new_tokens,
                         eos_token_id=stop)[0].tolist()
    end = next((k for k, t in enumerate(new) if t in stop), len(new))
    answer = new[: max(end, 1)]  # an answer that ends at once: explain its end token
    with keeping_attention(model, layers) as attns:
        logits, _ = model(torch.tensor([prompt + answer], device=device), pixels)  # (1, S, V)
        weights = [a.attention[0].mean(0) for a in attns]  # per layer (S, S), heads averaged
    N, start = model.vision_tower.num_tokens, prompt.index(IMAGE_TOKEN_INDEX)
    first = len(prompt) + N - 1  # the first answer token's position: the image took N positions for 1
    queries = torch.arange(first - 1, first - 1 + len(answer))  # the positions that predicted them
    probs = logits[0, queries].float().softmax(-1)  # (n, V)
    best = probs.topk(top + 1, dim=-1)
    alternatives = [[(word(tokenizer, i), p) for p, i in zip(ps.tolist(), ids.tolist()) if i != t][:top]
                    for ps, ids, t in zip(best.values, best.indices, answer)]
    return Answer(question=question, text=tokenizer.decode(answer).strip(),
                  tokens=[label(tokenizer.decode([t])) for t in answer],
                  probs=[probs[k, t].item() for k, t in enumerate(answer)], alternatives=alternatives,
                  layers=list(layers), attention=torch.stack([w[queries] for w in weights]).cpu(),
                  image=range(start, start + N))


def attention_sinks(answers, factor=2.0):
    """Patches that take more than `factor` times their even share (1/N) of the image attention under
    every question asked: what they draw does not depend on the question. Needs two questions."""
    if len(answers) < 2:
        return []
    focus = torch.stack([a.focus for a in answers])  # (Q, N)
    return (focus > factor / focus.size(1)).all(0).nonzero().flatten().tolist()

# -----------------------------------------------------------------------------
# Pictures

FONT = ImageFont.load_default(size=13)


def seen_image(pixel_values, image):
    """The (3, H, W) model input back as the picture the model saw (resized, padded): normalisation
    undone."""
    mean, std = torch.tensor(image.mean)[:, None, None], torch.tensor(image.std)[:, None, None]
    rgb = (pixel_values.cpu().float() * std + mean).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0) * 255).round().byte().numpy())


def draw_words(picture, labels, file, size=720):
    """The picture enlarged to about size x size pixels, its patch grid, and each patch's labels
    (a few short lines) on a white band at the top of the patch."""
    side = math.isqrt(len(labels))
    cell = max(64, size // side)
    image = picture.resize((cell * side, cell * side), Image.NEAREST)
    d = ImageDraw.Draw(image, "RGBA")
    for p, lines in enumerate(labels):
        x, y = (p % side) * cell, (p // side) * cell
        d.rectangle((x, y, x + cell - 1, y + cell - 1), outline=(90, 90, 90))
        d.rectangle((x + 1, y + 1, x + cell - 2, y + 4 + 15 * len(lines)), fill=(255, 255, 255, 200))
        for k, line in enumerate(lines):
            d.text((x + 4, y + 2 + 15 * k), line[: cell // 7], fill=(0, 0, 0), font=FONT)
    image.save(file)


def heat_panel(picture, weights, side, size, sinks=()):
    """The picture, greyed, under a red heat map of `weights` (N,) over its patches (scaled to their
    maximum); sink patches framed in blue."""
    grey = picture.convert("L").convert("RGB").resize((size, size), Image.NEAREST)
    panel = Image.blend(grey, Image.new("RGB", grey.size, "white"), 0.5)
    d, cell = ImageDraw.Draw(panel, "RGBA"), size / side
    top = float(weights.max()) or 1.0
    for p, w in enumerate(weights.tolist()):
        x, y = (p % side) * cell, (p // side) * cell
        d.rectangle((x, y, x + cell, y + cell), fill=(220, 30, 30, int(200 * w / top)))
        if p in sinks:
            d.rectangle((x + 1, y + 1, x + cell - 2, y + cell - 2), outline=(30, 60, 220), width=2)
    return panel


def draw_answer(picture, answer, side, file, sinks=(), panel=144):
    """One row per answer token: the token, its probability and runners-up, then one heat map of its
    attention over the patches per layer shown and their mean, each with its share on the image."""
    label_w, caption_h, title_h = 200, 18, 24
    columns = [(f"layer {layer}", answer.attention[k]) for k, layer in enumerate(answer.layers)]
    columns.append(("mean", answer.attention.mean(0)))
    rows = len(answer.tokens)
    width, height = label_w + len(columns) * (panel + 8), title_h + rows * (panel + caption_h + 8)
    image = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(image)
    d.text((6, 4), f"Q: {answer.question}    A: {answer.text}", fill=(0, 0, 0), font=FONT)
    for r, (token, p, alts) in enumerate(zip(answer.tokens, answer.probs, answer.alternatives)):
        y = title_h + r * (panel + caption_h + 8)
        d.text((6, y + 4), f"{token}   p = {p:.3f}", fill=(0, 0, 0), font=FONT)
        for k, (alt, q) in enumerate(alts):
            d.text((14, y + 26 + 16 * k), f"{alt}  {q:.3f}", fill=(110, 110, 110), font=FONT)
        for c, (name, attention) in enumerate(columns):
            x = label_w + c * (panel + 8)
            image.paste(heat_panel(picture, attention[r][answer.image], side, panel, sinks), (x, y))
            share = float(attention[r][answer.image].sum())
            d.text((x, y + panel + 1), f"{name}: {share:.0%} on image", fill=(0, 0, 0), font=FONT)
    image.save(file)

# -----------------------------------------------------------------------------
# The commands


def explain_image(model_dir, image_file, prompts, out_dir="explain", layers=None, device=None, k=3,
                  max_new_tokens=16):
    """Write words.png and answer_K.png for an image and prompts into out_dir, print what they show;
    returns the Answers."""
    if not prompts:
        raise InputError("give at least one --prompt (two or more to find attention sinks)")
    model, tokenizer, settings = chat.load_for_inference(model_dir, device)
    side, n_layers = grid_side(model), model.language_model.config.num_hidden_layers
    layers = shown_layers(n_layers) if layers is None else layers
    if bad := [i for i in layers if not 0 <= i < n_layers]:
        raise InputError(f"--layers {bad}: the LLM has layers 0 to {n_layers - 1}")
    pixel_values = data.load_image(image_file, settings.image)
    picture = seen_image(pixel_values, settings.image)
    os.makedirs(out_dir, exist_ok=True)
    device = model.language_model.lm_head.weight.device
    words = patch_words(model, tokenizer, pixel_values[None].to(device), k)[0]
    labels = [[f"{w} {c:.2f}" for w, c in ws] for ws in words]
    draw_words(picture, labels, os.path.join(out_dir, "words.png"))
    print(f"{model_dir} on {image_file}: {side * side} image tokens ({side}x{side} patches), "
          f"attention of layers {', '.join(map(str, layers))}")
    print(f"image tokens as words ({k} nearest by cosine) -> {os.path.join(out_dir, 'words.png')}")
    if side <= 6:
        for r in range(side):
            print("  " + " | ".join(", ".join(w for w, _ in words[r * side + c]) for c in range(side)))
    answers = [explain_answer(model, tokenizer, settings, pixel_values, q, layers, max_new_tokens)
               for q in prompts]
    sinks = attention_sinks(answers)
    for n, a in enumerate(answers, 1):
        file = os.path.join(out_dir, f"answer_{n}.png")
        draw_answer(picture, a, side, file, sinks)
        print(f"{a.question!r} -> {a.text!r} -> {file}")
        for t, token in enumerate(a.tokens):
            alts = ", ".join(f"{w} {p:.3f}" for w, p in a.alternatives[t])
            shares = ", ".join(f"layer {layer} {a.on_image[j, t]:.0%}"
                               for j, layer in enumerate(a.layers))
            patch = int(a.attention[:, t][:, a.image].mean(0).argmax())
            print(f"  {token:<10} p={a.probs[t]:.3f} (then {alts}); on the image: "
                  f"{shares}; most on patch (row {patch // side}, col {patch % side})")
    if len(answers) > 1:
        where = ", ".join(f"(row {p // side}, col {p % side})" for p in sinks) or "none"
        print(f"patches with over twice their share of the image attention under every prompt: {where}")
    return answers


def shown_layers(n_layers, most=8):
    """Every layer of a small LLM; `most` of a deep one, evenly spaced from the first to the last."""
    if n_layers <= most:
        return list(range(n_layers))
    return sorted({round(k * (n_layers - 1) / (most - 1)) for k in range(most)})


def share(model_dir, data_dir, split="test", k=3, device=None, seed=0):
    """Print and return word_share for the model and for a random projector in its place."""
    model, tokenizer, _ = chat.load_for_inference(model_dir, device)
    trained = word_share(model, tokenizer, data_dir, split, k)
    with random_projector(model, seed):
        random = word_share(model, tokenizer, data_dir, split, k)
    print(f"cells of the {split} images of {data_dir} whose {k} nearest words name them "
          f"({trained['cells']} cells):")
    print(f"  {'':<24}{'colour':>8}{'shape':>8}{'empty':>8}{'all':>8}  length (x a word's)")
    for name, r in ((model_dir, trained), ("random projector", random)):
        shares = "".join(f"{r[c]:8.1%}" for c in ("color", "shape", "empty", "all"))
        print(f"  {name[-24:]:<24}{shares}  {r['length']:.1f}")
    return trained, random


@torch.no_grad()
def look(model_dir, data_file, device=None):
    """On the shapes data's held-out position questions ("Where is the red circle?"): which queries
    find the asked object, i.e. attend most, among the patches, to its cell: the question's colour
    word, its shape word, the one that says the answer's first word; per layer. Printed and returned
    as {query: [share per layer]}."""
    model, tokenizer, settings = chat.load_for_inference(model_dir, device)
    device = model.language_model.lm_head.weight.device
    layers = list(range(model.language_model.config.num_hidden_layers))
    cells, N = shapes.patch_cells(grid_side(model)), model.vision_tower.num_tokens
    folder = os.path.dirname(os.path.abspath(data_file))
    samples = [s for s in data.load_samples(data_file) if s.get("type") == "position"]
    if not samples:
        raise InputError(f"{data_file}: no samples of type 'position'")
    with open(os.path.join(folder, "meta.json")) as f:
        objects = {m["image"]: m["objects"] for m in json.load(f)["images"]}
    hits = {q: [0] * len(layers) for q in ("colour word", "shape word", "answer")}
    for s in samples:
        turns = [{"from": "human", "value": data.image_first(s["conversations"][0]["value"])}]
        prompt = data.build_prompt(turns, tokenizer, settings.template)
        answer = s["conversations"][1]["value"]
        cell = shapes.CELLS.index(answer) if answer in shapes.CELLS else None
        o = next((o for o in objects.get(s["image"], []) if o["cell"] == cell), None)
        words = [word(tokenizer, i) if i != IMAGE_TOKEN_INDEX else "" for i in prompt]
        at = {a: [i for i, w in enumerate(words) if w == o[a]] for a in ("color", "shape")} if o else {}
        if not (at.get("color") and at.get("shape")):
            raise InputError(f"{data_file}: sample {s['id']}: not a shapes position question whose "
                             "colour and shape are single tokens, about an object of meta.json")
        start = prompt.index(IMAGE_TOKEN_INDEX)

        def spliced(i):  # a prompt position after the image, in the sequence the LLM reads
            return i + N - 1

        queries = {"colour word": spliced(at["color"][-1]), "shape word": spliced(at["shape"][-1]),
                   "answer": spliced(len(prompt) - 1)}
        pixels = data.load_image(os.path.join(folder, s["image"]), settings.image)[None].to(device)
        with keeping_attention(model, layers) as attns:
            model(torch.tensor([prompt], device=device), pixels)
            weights = [a.attention[0].mean(0)[:, start : start + N] for a in attns]  # (S, N) per layer
        for q, position in queries.items():
            for j, w in enumerate(weights):
                hits[q][j] += cells[int(w[position].argmax())] == cell
    share = {q: [h / len(samples) for h in hs] for q, hs in hits.items()}
    print(f"{len(samples)} position questions of {data_file}: how often a query's most attended patch "
          "lies in the asked object's cell")
    print(f"  {'query':<14}" + "".join(f"{'layer ' + str(i):>10}" for i in layers))
    for q, v in share.items():
        print(f"  {q:<14}" + "".join(f"{x:10.1%}" for x in v))
    return share


def main(argv=None):
    parser = argparse.ArgumentParser(description="tinyllava: see inside a trained model")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("image", help="words.png and answer_K.png for one image")
    p.add_argument("--model", required=True, help="runs/sft (stage 2) or runs/pt (stage 1)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", action="append", default=[], help="a question (repeat for several)")
    p.add_argument("--out", default="explain", help="folder for the pictures")
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")],
                   help="decoder layers whose attention is drawn, e.g. 0,5,11 (default: up to 8)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    w = sub.add_parser("look", help="on the shapes data: does a position answer look at the object?")
    w.add_argument("--model", required=True, help="runs/sft (stage 2)")
    w.add_argument("--data", default="data/shapes/test.json", help="held-out questions with a 'type'")
    w.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s = sub.add_parser("share", help="on the shapes data: cells whose nearest words name them")
    s.add_argument("--model", required=True, help="runs/pt (stage 1) or runs/sft (stage 2)")
    s.add_argument("--data", default="data/shapes", help="the shapes data set (its meta.json)")
    s.add_argument("--split", default="test", choices=["test", "val", "train"])
    for q in (p, s):
        q.add_argument("--k", type=int, default=3, help="nearest words per patch")
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.command == "image":
        if args.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens {args.max_new_tokens}: an answer needs at least 1 token")
        if not os.path.isfile(args.image):
            raise InputError(f"no image file {args.image!r}")
        explain_image(args.model, args.image, args.prompt, out_dir=args.out, layers=args.layers,
                      device=args.device, k=args.k, max_new_tokens=args.max_new_tokens)
    elif args.command == "look":
        look(args.model, args.data, device=args.device)
    else:
        share(args.model, args.data, args.split, k=args.k, device=args.device)


if __name__ == "__main__":
    command_line(main)
