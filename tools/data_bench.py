"""
The data path at real size: how long a data set takes to start, how much memory it holds, how fast
the loader feeds images, and how much of a training step waits for data. Everything is made on the
spot: LLaVA-Instruct-like multi-turn conversations and 640x480 JPEGs (no download).

    python -m tools.data_bench          # 100k conversations; 224 and 384 px; 0, 1, 2 workers
    python -m tools.data_bench --samples 20000 --workers 0 2 4 --sizes 336

Prints: data set start-up seconds and resident memory per 100k samples; loader samples/s per image
size and worker count; a training step of a small random LLaVA with batches from the loader against
batches already in memory, and the share of the step spent waiting for data.
"""

import argparse
import json
import os
import random
import tempfile
import time
from functools import partial

import torch
from PIL import Image, ImageDraw

import data
import train
import train_pt
from offline import standins
from tinyllava import LanguageModel, LMConfig, TinyLlava, VisionConfig, VisionTower, command_line

WORDS = ("the a of in on with and is are there what where how many color shape left right top "
         "bottom person dog cat car street table window people standing sitting holding wearing "
         "red blue green white black small large building tree sky water road sign picture image "
         "scene front behind near next looks like appears shows two three several some one").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_data(folder, n_samples, n_images, seed=0):
    """n_images 640x480 JPEGs (gradients and shapes, so they compress like photos, not like noise)
    and n_samples LLaVA-Instruct-like conversations about them: 1-4 turns, ~250 tokens in all."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for i in range(n_images):
        im = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(8):
            x, y = rng.randrange(600), rng.randrange(440)
            draw.ellipse((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)),
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        im.save(os.path.join(folder, "images", f"{i:05d}.jpg"), quality=90)
    samples = []
    for i in range(n_samples):
        turns = []
        for k in range(rng.randint(1, 4)):
            prefix = "<image>\n" if k == 0 else ""
            question = prefix + sentence(rng, rng.randint(6, 14)).replace(".", "?")
            answer = " ".join(sentence(rng, rng.randint(8, 20)) for _ in range(rng.randint(2, 4)))
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        image = f"images/{i % n_images:05d}.jpg"
        samples.append({"id": str(i), "image": image, "conversations": turns})
    file = os.path.join(folder, "conversations.json")
    with open(file, "w") as f:
        json.dump(samples, f)
    return file


def make_tokenizer(folder):
    """A byte-level BPE over the bench's words and chatml's, as the offline stand-in's is made."""
    text = [" ".join(WORDS), "system user assistant You are a helpful assistant."] * 100
    return standins.train_tokenizer(text, folder, vocab_size=1000)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def loader_rate(dataset, workers, batch_size, collate, batches=20):
    """Samples per second that a DataLoader with `workers` processes delivers (after its first
    batch)."""
    cfg = train.TrainConfig(num_workers=workers)
    starts = range(0, batch_size * (batches + 1), batch_size)
    order = [list(range(k, k + batch_size)) for k in starts]
    it = iter(train.make_loader(dataset, order, collate, cfg, torch.device("cpu")))
    next(it)
    t0 = time.time()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.time() - t0)


def small_llava(image_size, vocab_size):
    """A random LLaVA of small width: a ViT with 16-px patches and a 4-layer Llama."""
    vision = VisionTower(VisionConfig(image_size=image_size, patch_size=16, hidden_size=192,
                                      intermediate_size=768, num_hidden_layers=4,
                                      num_attention_heads=3))
    lm = LanguageModel(LMConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                head_dim=64, max_position_embeddings=4096))
    return TinyLlava(vision, lm)


def step_times(model, dataset, collate, workers, batch_size, steps):
    """(seconds per training step with batches from the loader, share of it spent waiting for
    data)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = train.TrainConfig(num_workers=workers)
    starts = range(0, batch_size * (steps + 1), batch_size)
    order = [list(range(k, k + batch_size)) for k in starts]
    it = iter(train.make_loader(dataset, order, collate, cfg, torch.device("cpu")))
    waited, t0 = 0.0, None
    for k in range(steps + 1):
        if k == 1:  # the first step warms up (workers start, allocations)
            waited, t0 = 0.0, time.time()
        t = time.time()
        batch = next(it)
        waited += time.time() - t
        loss, _, _ = train_pt.llava_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    total = time.time() - t0
    return total / steps, waited / total


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.data_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000,
                        help="conversations in the data set")
    parser.add_argument("--images", type=int, default=300,
                        help="distinct JPEGs the conversations share")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384],
                        help="image sides to time")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="loader processes to time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6,
                        help="training steps per timing (0 = no model)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.time()
        file = make_data(folder, args.samples, args.images)
        tok = make_tokenizer(folder)
        print(f"made {args.samples:,} conversations and {args.images} 640x480 JPEGs "
              f"in {time.time() - t0:.0f} s")
        collate = partial(data.collate, pad_id=tok.pad_id)
        before, t0 = rss_mb(), time.time()
        image = data.ImageConfig(args.sizes[0], data.CLIP_MEAN, data.CLIP_STD)
        cache = os.path.join(folder, "cache")
        dataset = data.ConversationDataset(file, tok, "chatml", image, cache_dir=cache)
        seconds, memory = time.time() - t0, rss_mb() - before
        t0 = time.time()
        data.ConversationDataset(file, tok, "chatml", image, cache_dir=cache)
        cached = time.time() - t0
        per = 100_000 / len(dataset)
        print(f"data set start-up: {seconds:.1f} s and {memory:,.0f} MB more resident (the JSON "
              f"included) for {len(dataset):,} samples ({seconds * per:.1f} s, "
              f"{memory * per:,.0f} MB per 100k); "
              f"{cached:.1f} s from the cache the first start wrote "
              f"({cached * per:.1f} s per 100k)")
        arrays = (dataset.tokens, dataset.trained, dataset.lengths, dataset.offsets)
        held = sum(a.nbytes for a in arrays)
        print(f"the token arrays: {held / len(dataset):,.0f} bytes per sample")
        for size in args.sizes:
            dataset.image = data.ImageConfig(size, data.CLIP_MEAN, data.CLIP_STD)
            rates = {w: loader_rate(dataset, w, args.batch_size, collate) for w in args.workers}
            print(f"loader at {size} px: "
                  + ", ".join(f"{w} workers {r:,.0f} samples/s" for w, r in rates.items()))
            if not args.steps:
                continue
            model = small_llava(size, tok.vocab_size)
            model.vision_tower.requires_grad_(False)  # stage 2: projector and LLM trained
            in_memory = [collate([dataset[i] for i in range(k, k + args.batch_size)])
                         for k in range(0, args.batch_size * (args.steps + 1), args.batch_size)]
            s_mem, _ = step_times(model, in_memory, lambda b: b[0], 0, 1, args.steps)
            for w in args.workers:
                s, wait = step_times(model, dataset, collate, w, args.batch_size, args.steps)
                print(f"  train step at {size} px, batch {args.batch_size}: {w} workers {s:.2f} s "
                      f"({wait:.0%} waiting for data); batches in memory {s_mem:.2f} s")


if __name__ == "__main__":
    command_line(main)
