"""
The synthetic shapes data set: a clean, learnable, offline image-question world for the offline pipeline.

Each 3x3-grid image holds 1 to 3 coloured shapes, one per cell. make_shapes writes the images and
four LLaVA-format files: captions (stage 1), conversations (stage 2: random multi-turn ones, some
text-only, and focused ones on finding an object by colour and shape, and on descriptions), one
held-out question per test image, and the objects of every image (meta.json). The same generator
writes the stand-in LLM's pretraining text (offline/standins.py), always about freshly drawn scenes.

Run: python -m offline.shapes data/shapes [--n-images 4000] [--size 48]
"""

import argparse
import json
import os
import random
import time

from PIL import Image, ImageDraw

from data import IMAGE_TAG
from tinyllava import command_line

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
       "yellow": (235, 195, 20)}
# as a fraction of a grid cell: clearly apart, never overlapping
DIAMETER = {"small": 0.45, "large": 0.8}
# a 3x3 grid, row by row: cell = 3 * row + col
CELLS = ("top left", "top center", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom center", "bottom right")
TEXT_FACTS = [("What color do you get by mixing red and yellow?", "orange"),
              ("What color do you get by mixing blue and yellow?", "green"),
              ("What color do you get by mixing red and blue?", "purple"),
              ("What color do you get by mixing red and white?", "pink"),
              ("How many sides does a triangle have?", "3"),
              ("How many sides does a square have?", "4"),
              ("How many corners does a diamond have?", "4"),
              ("Which shape has no corners?", "circle"),
              ("What color is grass?", "green"), ("What color is a banana?", "yellow"),
              ("What color is the sky on a clear day?", "blue"),
              ("What color is a strawberry?", "red")]
TEXT_FACTS += [(f"What is {a} plus {b}?", str(a + b)) for a in range(5) for b in range(5)]


def draw_shapes(objects, size, rng):
    """Objects {"shape", "color", "size", "cell"} on white, each jittered a little inside its own
    cell (so they never overlap); drawn at 4x and box-downsampled so the edges are anti-aliased."""
    S, cell = 4 * size, 4 * size / 3
    image = Image.new("RGB", (S, S), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for o in objects:
        r = DIAMETER[o["size"]] * cell / 2
        slack = 0.5 * (cell / 2 - r)  # a little jitter, but centres stay well inside their cell
        cx = (o["cell"] % 3 + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (o["cell"] // 3 + 0.5) * cell + rng.uniform(-slack, slack)
        fill = RGB[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image.reduce(4)


def patch_cells(side):
    """The grid cell (0-8, row by row) that each patch of a side x side patch grid lies in, the patches
    row by row: side 3 gives one patch per cell, side 6 four."""
    return [3 * (r * 3 // side) + c * 3 // side for r in range(side) for c in range(side)]


def caption(objects):
    """Objects in cell order:
    'a large red circle at the top left and a small blue square at the center.'"""
    parts = [f"a {o['size']} {o['color']} {o['shape']} at the {CELLS[o['cell']]}" for o in objects]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def ask(kind, objects, rng, hard=False):
    """One (question, answer) of a kind about the objects, or None if that kind would be ambiguous
    here. hard=True asks "is there a ...?" about absent objects that share a colour or a shape with
    one that is there, when possible: the questions that only a colour-and-shape match answers."""
    count = lambda **kw: sum(all(o[k] == v for k, v in kw.items()) for o in objects)  # noqa: E731

    def unique(*keys):  # the objects that no other shares these attributes with
        values = [tuple(o[k] for k in keys) for o in objects]
        return [o for o, v in zip(objects, values) if values.count(v) == 1]

    if kind == "color" and unique("shape"):
        o = rng.choice(unique("shape"))
        return f"What color is the {o['shape']}?", o["color"]
    if kind == "shape" and unique("color"):
        o = rng.choice(unique("color"))
        return f"What shape is the {o['color']} object?", o["shape"]
    if kind in ("size", "position") and unique("color", "shape"):
        o = rng.choice(unique("color", "shape"))
        if kind == "size":
            return f"Is the {o['color']} {o['shape']} small or large?", o["size"]
        return f"Where is the {o['color']} {o['shape']}?", CELLS[o["cell"]]
    if kind == "count":
        which = rng.choice(["all", "color", "shape"])
        if which == "color":
            c = rng.choice(COLORS)
            return f"How many {c} shapes are there?", str(count(color=c))
        if which == "shape":
            s = rng.choice(SHAPES)
            return f"How many {s}s are there?", str(count(shape=s))
        return "How many shapes are there?", str(len(objects))
    if kind == "exists":
        if rng.random() < 0.5:  # half the time ask about an object that is there
            o = rng.choice(objects)
            return f"Is there a {o['color']} {o['shape']}?", "yes"
        present = [(o["color"], o["shape"]) for o in objects]
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        if hard:
            colors, kinds = {c for c, _ in present}, {s for _, s in present}
            absent = [(c, s) for c, s in absent if c in colors or s in kinds] or absent
        c, s = rng.choice(absent)
        return f"Is there a {c} {s}?", "no"
    return None


QUESTION_KINDS = ("color", "shape", "size", "position", "count", "exists")


def random_objects(rng):
    """1 to 3 objects of random shape, colour and size, each in its own grid cell, in cell order."""
    cells = sorted(rng.sample(range(9), rng.randint(1, 3)))
    return [dict(shape=rng.choice(SHAPES), color=rng.choice(COLORS), size=rng.choice(SIZES), cell=c)
            for c in cells]


def random_questions(objects, rng, n_turns=None, hard=False, describe=0.2, distinct=False):
    """The (question, answer) turns of one stage-2 conversation: n_turns (default 2 to 4), opening
    with a caption with probability `describe`. hard: see ask(). distinct: never ask the same
    question twice in a conversation (a repeated question is answered by copying the earlier answer,
    not by looking at the image)."""
    qas = [("Describe the image.", caption(objects))] if rng.random() < describe else []
    n_turns = n_turns or rng.randint(2, 4)
    while len(qas) < n_turns:
        qa = ask(rng.choice(QUESTION_KINDS), objects, rng, hard)
        if qa and not (distinct and any(qa[0] == q for q, _ in qas)):
            qas.append(qa)
    return qas


def confusable(objects):
    """The objects that share their colour or their shape with another one, but not both: only the
    two together single them out."""
    same = lambda o, p, keys: all(o[k] == p[k] for k in keys)  # noqa: E731
    return [o for o in objects
            if sum(same(o, p, ("color", "shape")) for p in objects) == 1
            and sum(same(o, p, ("color",)) or same(o, p, ("shape",)) for p in objects) > 1]


def focused_conversations(meta, rng):
    """Stage 2's second source, beside its random conversations (as LLaVA-Instruct has detailed
    descriptions beside its conversations), on what the projector's tokens make hardest for the LLM:
    for each training image with a confusable object, "Where is ...?" about each of them and then a
    description (after the answers, so that they are read from the image, not copied from the
    description); then a description alone of each training image with more than one object."""
    lookups, descriptions = [], []
    for i, m in enumerate(meta):
        objects = m["objects"]
        if m["split"] != "train" or len(objects) < 2:
            continue
        if hard := confusable(objects):
            qas = [(f"Where is the {o['color']} {o['shape']}?", CELLS[o["cell"]])
                   for o in rng.sample(hard, len(hard))]
            lookups.append(dict(id=f"lookup-{i:05d}", image=m["image"], conversations=chat_turns(
                qas + [("Describe the image.", caption(objects))], image=True)))
        descriptions.append(dict(id=f"describe-{i:05d}", image=m["image"], conversations=chat_turns(
            [("Describe the image.", caption(objects))], image=True)))
    return lookups + descriptions


def make_shapes(out_dir, n_images=4000, seed=0, size=64, test_frac=0.1):
    """Write images/*.png, captions.json (stage 1), instruct.json (stage 2), test.json (held-out
    images, one short-answer question each) and meta.json (the objects of every image); then the
    validation split and the held-out conversations (make_held_out)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    n_test = round(n_images * test_frac)
    meta, captions, instruct, test = [], [], [], []
    for i in range(n_images):
        objects = random_objects(rng)
        image = f"images/{i:05d}.png"
        draw_shapes(objects, size, rng).save(os.path.join(out_dir, image))
        split = "test" if i >= n_images - n_test else "train"
        meta.append(dict(image=image, split=split, objects=objects))
        if split == "test":
            kind, q, a = one_question(i, objects, rng)
            test.append(dict(id=f"test-{i:05d}", image=image, type=kind,
                             conversations=chat_turns([(q, a)], image=True)))
            continue
        captions.append(dict(id=f"caption-{i:05d}", image=image, conversations=[
            {"from": "human", "value": IMAGE_TAG}, {"from": "gpt", "value": caption(objects)}]))
        qas = random_questions(objects, rng)
        instruct.append(dict(id=f"instruct-{i:05d}", image=image,
                             conversations=chat_turns(qas, image=True)))
    # text-only: one for every nine conversations above, so the LLM keeps answering without images
    for i in range(len(instruct) // 9):
        facts = rng.sample(TEXT_FACTS, rng.randint(1, 2))
        instruct.append(dict(id=f"text-{i:05d}", conversations=chat_turns(facts)))
    instruct += focused_conversations(meta, rng)
    rng.shuffle(instruct)
    for name, samples in [("captions", captions), ("instruct", instruct), ("test", test)]:
        write_samples(os.path.join(out_dir, f"{name}.json"), samples)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(dict(size=size, shapes=SHAPES, colors=COLORS, sizes=SIZES, cells=CELLS,
                       images=meta), f)
    counts = dict(captions=len(captions), instruct=len(instruct), test=len(test))
    return {**counts, **make_held_out(out_dir, seed=seed, n_val=n_test)}


def one_question(i, objects, rng):
    """(kind, question, answer) for held-out image i: the kinds take turns, so each is asked about
    equally often; a kind that would be ambiguous for these objects passes to the next."""
    kinds = QUESTION_KINDS[i % len(QUESTION_KINDS):] + QUESTION_KINDS
    return next((k, *qa) for k in kinds if (qa := ask(k, objects, rng)))


def make_held_out(out_dir, seed=0, n_val=400, n_questions=3):
    """Add three held-out files to a shapes data set, each from its own random stream, so that the
    images and files make_shapes wrote stay as they are (meta.json gains the validation images):
    - val.json: n_val new images (images/val-*.png) with one question each, like test.json, for
      choosing between recipes; the test set is then scored once, with the recipe chosen;
    - test_chat.json: one conversation per test image, a description and then n_questions questions
      of different kinds, each turn typed ("types"), to be answered after the model's own earlier
      answers (chat.evaluate_model), as a student chats;
    - val_chat.json: the same about the validation images, to choose on."""
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    meta["images"] = [m for m in meta["images"] if m["split"] != "val"]
    rng = random.Random(f"val-{seed}")
    val = []
    for i in range(n_val):
        objects = random_objects(rng)
        image = f"images/val-{i:05d}.png"
        draw_shapes(objects, meta["size"], rng).save(os.path.join(out_dir, image))
        meta["images"].append(dict(image=image, split="val", objects=objects))
        kind, q, a = one_question(i, objects, rng)
        val.append(dict(id=f"val-{i:05d}", image=image, type=kind,
                        conversations=chat_turns([(q, a)], image=True)))
    files = {"val": val}
    for split, name, stream in (("test", "test_chat", "chat"), ("val", "val_chat", "val-chat")):
        images = [m for m in meta["images"] if m["split"] == split]
        files[name] = held_out_chats(images, random.Random(f"{stream}-{seed}"), n_questions)
    for name, samples in files.items():
        write_samples(os.path.join(out_dir, f"{name}.json"), samples)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return {name: len(samples) for name, samples in files.items()}


def held_out_chats(images, rng, n_questions):
    """One conversation per image (meta.json's entries): "Describe the image." and then n_questions
    questions, the kinds taking turns from image to image, none asked twice."""
    chats = []
    for i, m in enumerate(images):
        qas, types = [("Describe the image.", caption(m["objects"]))], ["describe"]
        for kind in QUESTION_KINDS[i % len(QUESTION_KINDS):] + QUESTION_KINDS:
            qa = ask(kind, m["objects"], rng) if len(qas) <= n_questions else None
            if qa and qa[0] not in (q for q, _ in qas):
                qas.append(qa)
                types.append(kind)
        chats.append(dict(id=f"chat-{os.path.basename(m['image'])[:-4]}", image=m["image"], types=types,
                          conversations=chat_turns(qas, image=True)))
    return chats


def write_samples(file, samples):
    """A JSON list with one sample per line: greppable."""
    with open(file, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(s) for s in samples) + "\n]\n")


def chat_turns(qas, image=False):
    """(question, answer) pairs -> LLaVA conversation turns; the image tag opens the first question."""
    turns = []
    for k, (q, a) in enumerate(qas):
        turns += [{"from": "human", "value": (IMAGE_TAG + "\n" if image and k == 0 else "") + q},
                  {"from": "gpt", "value": a}]
    return turns


def main(argv=None):
    parser = argparse.ArgumentParser(description="write the synthetic shapes data set")
    parser.add_argument("out_dir")
    parser.add_argument("--n-images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args(argv)
    t0 = time.time()
    counts = make_shapes(args.out_dir, n_images=args.n_images, seed=args.seed, size=args.size)
    print(f"wrote {args.n_images} images to {args.out_dir} in {time.time() - t0:.1f}s: "
          + ", ".join(f"{k}.json {v} samples" for k, v in counts.items()))


if __name__ == "__main__":
    command_line(main)
