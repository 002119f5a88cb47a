"""
Stage 0 of the offline pipeline: tiny stand-ins for the pretrained CLIP and LLM that LLaVA starts from.

LLaVA never trains its encoders from scratch: it aligns a *pretrained* vision tower with a
*pretrained* LLM. Offline we cannot download either, and freezing random networks would teach
nothing (a frozen random LLM cannot caption anything, however good the projector). So we first
pretrain two tiny ones on the shapes data set, then save them in the Hugging Face formats, so that
stages 1 and 2 load them through exactly the same `from_pretrained` code as real CLIP / Llama
weights:

  vision: a CLIP-format ViT (48 px, 16 px patches: one patch per cell of the shapes' 3x3 grid)
          trained to classify the shape, colour and size of the object in every cell (or "empty")
          from that patch's feature in the *penultimate* layer, the one LLaVA reads (so the feature
          LLaVA sees is the trained one). A real CLIP has one more layer after it; we append an
          untrained one so the checkpoint has that shape, and select_layer=-2 skips it again on
          load, as LLaVA-1.5 skips CLIP's last layer.
  llm:    a Llama-format decoder with its own byte-level BPE tokenizer.json, pretrained as a chat
          model (loss on the replies) on text about freshly drawn scenes (the shapes generator:
          captions in stage 1's template, conversations in stage 2's chatml), with the image written
          as nine "soft words", one input vector per grid cell: the sum of the embeddings of the
          words naming that cell and its content ("top left large red circle", "center empty").
          So it already knows the chat format and how to answer a question about a scene given as
          word vectors; LLaVA's job is to teach the projector to produce such vectors from pixels.
          The held-out test images are never seen here.

Run alone: python -m offline.standins [--data-dir data/shapes] [--out-dir runs/standins]
(train_pt.py runs it when the stand-ins are missing). What was tried to get here: docs/results.md.
"""

import argparse
import contextlib
import functools
import gc
import json
import os
import random
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data
from offline import shapes
from tinyllava import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    InputError,
    LanguageModel,
    LMConfig,
    VisionConfig,
    VisionLayer,
    VisionTower,
    command_line,
    init_weights,
    padding_mask,
    trained_cross_entropy,
    write_json,
)
from train import TrainConfig, barrier, init_distributed, is_main, train, unwrap

DATA_DIR, OUT_DIR = "data/shapes", "runs/standins"
N_IMAGES, IMAGE_SIZE = 4000, 48  # 3,600 training images + 400 held out; 48 px = 3 cells of 16 px
# as the CLIP processor saved below reads it
IMAGE = data.ImageConfig(IMAGE_SIZE, data.CLIP_MEAN, data.CLIP_STD)

# built: the 2 layers LLaVA uses (select_layer=-2), and a third appended untrained when saved
VISION = VisionConfig(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=16,
                      hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                      num_attention_heads=4, select_layer=-2)
# 24 epochs, not 8: after 8 the features still give 1.6% of the validation objects the wrong shape
# (a small square read as a circle, a small triangle as a diamond), and a question that names such
# an object cannot find it (docs/results.md)
VISION_TRAIN = dict(lr=3e-3, epochs=24, batch_size=64, micro_batch_size=64, warmup=0.05,
                    weight_decay=0.01)

# end of text (bos/eos/pad), chatml's turn markers
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# 8 heads of 32 (the attention twice as wide as the residual stream), not 4: with 4, some
# initialisations never learn to find an object by its shape and its colour together and answer
# with another object's attribute (docs/results.md); an MLP of 2x the width, not 3x, pays for part
# of their time
LM = dict(model_type="llama", vocab_size=800, hidden_size=128, intermediate_size=256,
          num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, head_dim=32,
          max_position_embeddings=256, tie_word_embeddings=True)
# Initial std of the LLM's matrices: GPT-2's 0.02 (tinyllava.init_weights) is ~0.55/sqrt(768), made
# for width 768; at width 128 it keeps every attention logit near 0 for long, and the question ->
# grid cell lookup the LLM must learn forms thousands of steps late. 0.1 is ~1/sqrt(128), the fan-in
# scale.
LM_INIT_STD = 0.1
LM_DOCS = 64_000  # pretraining documents, each about a freshly drawn scene: 4,000 steps of 16
LM_TURNS = 6  # questions per pretraining conversation (see lm_documents)
# the share of those conversations that open with a description: 0.3, not 0.1; with 0.1 one
# description in five of a validation scene, given as soft words, takes an attribute from the wrong
# object or skips one (docs/results.md)
LM_DESCRIBE = 0.3
# a from-scratch LM's recipe (nanoGPT's beta2 0.95, weight decay 0.1); batches of 16, not 8: with
# half the documents the lookup of a cell by its colour and shape (the position questions) formed
# from some initialisations only. lr 2e-3, not 1.5e-3: from some initialisations the loss plateaus
# for ~1,500 steps before that lookup forms, and 1.5e-3's cosine has decayed by then (docs/results.md)
LM_TRAIN = dict(lr=2e-3, epochs=1, batch_size=16, micro_batch_size=16, warmup=0.02,
                weight_decay=0.1, beta2=0.95)

# -----------------------------------------------------------------------------
# The vision stand-in


class CellClassifier(nn.Module):
    """The vision tower plus one linear head reading every patch: shape, colour, size of what is in
    its grid cell, and which cell it is. Without that last target the features keep their position
    in a form the projector cannot read, so it cannot write the cell's name into the soft word.
    A real CLIP's patch features do carry their position."""

    def __init__(self, tower, n_classes):
        super().__init__()
        self.tower, self.n_classes = tower, n_classes
        self.head = nn.Linear(tower.config.hidden_size, sum(n_classes))

    def forward(self, pixel_values):
        return self.head(self.tower(pixel_values))  # (B, N, sum(n_classes))


def cell_targets(objects, side=3):
    """(side * side, 4) class ids per patch of a side x side grid: shape, colour and size of the
    object in the patch's grid cell (each 0 for an empty cell), and the cell's index. side=3: one
    patch per cell."""
    t = torch.zeros(9, 4, dtype=torch.long)
    t[:, 3] = torch.arange(9)
    for o in objects:
        t[o["cell"]] = torch.tensor([shapes.SHAPES.index(o["shape"]) + 1,
                                     list(shapes.COLORS).index(o["color"]) + 1,
                                     list(shapes.SIZES).index(o["size"]) + 1, o["cell"]])
    return t[shapes.patch_cells(side)]


def cell_loss(model, batch):
    logits = model(batch["pixel_values"])  # (B, N, C)
    targets = batch["labels"]  # (B, N, 4)
    n_classes = unwrap(model).n_classes
    loss = sum(F.cross_entropy(part.reshape(-1, part.size(-1)), t.reshape(-1), reduction="sum")
               for part, t in zip(logits.split(n_classes, dim=-1), targets.unbind(-1)))
    return loss, targets.numel(), targets.shape[0] * targets.shape[1]


def load_cells(data_dir, split, side=3):
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    samples = []
    for m in meta["images"]:
        if m["split"] == split:
            pixels = data.load_image(os.path.join(data_dir, m["image"]), IMAGE)
            samples.append(dict(pixel_values=pixels, labels=cell_targets(m["objects"], side)))
    return samples


def stack(batch):
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def train_vision(data_dir, out_dir, device, patch_size=VISION.patch_size, seed=0, **overrides):
    """The vision stand-in, saved to out_dir/vision. patch_size 16 gives one patch per grid cell, as
    the pipeline uses; 8 gives 2x2 patches per cell (exercise 8's study pools them back to one).
    seed: the initialisation and the data order."""
    config = replace(VISION, patch_size=patch_size)
    side = IMAGE_SIZE // patch_size
    if side % 3:
        raise InputError(f"patch size {patch_size}: the {side}x{side} patch grid does not tile "
                         "the 3x3 grid of cells")
    torch.manual_seed(seed)
    n_classes = [len(shapes.SHAPES) + 1, len(shapes.COLORS) + 1, len(shapes.SIZES) + 1, 9]
    model = CellClassifier(VisionTower(config), n_classes).to(device)
    train_set, test_set = load_cells(data_dir, "train", side), load_cells(data_dir, "test", side)
    cfg = TrainConfig(**{**VISION_TRAIN, "out_dir": os.path.join(out_dir, "vision_train"), "seed": seed,
                         **overrides})
    train(model, train_set, collate_fn=stack, loss_fn=cell_loss, cfg=cfg, eval_set=test_set)
    with torch.no_grad():  # held-out accuracy per attribute, over all patches of every test image
        batch = stack(test_set)
        logits = model(batch["pixel_values"].to(device))
        pred = torch.stack([p.argmax(-1) for p in logits.split(n_classes, -1)], -1)
        acc = (pred.cpu() == batch["labels"]).float().mean((0, 1))
    path = os.path.join(out_dir, "vision")
    if not is_main():  # under torchrun, process 0 writes
        return path, acc
    accuracies = ", ".join(f"{k} {a:.1%}" for k, a in zip(("shape", "color", "size", "cell"), acc))
    print("vision stand-in, held-out cell accuracy: " + accuracies)
    tower = model.tower.cpu()
    # CLIP's last layer, which LLaVA skips
    tower.encoder.layers.append(VisionLayer(config).apply(init_weights))
    tower.save_pretrained(path)
    # what CLIPImageProcessor needs to read the images
    write_json(os.path.join(path, "preprocessor_config.json"), {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE}, "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(data.CLIP_MEAN), "image_std": list(data.CLIP_STD),
        "do_convert_rgb": True})
    return path, acc

# -----------------------------------------------------------------------------
# The language-model stand-in: it learns to read scenes written in "soft words"


def attribute_words(tok):
    """word -> the token ids its soft word sums: the word with a leading space (" red", as in a
    caption), which must be a single token; the bare word ("red", as an answer starts) where that is
    a single token too; and for a shape its plural (" circles") where that is one token. Count
    questions name a colour in the singular ("how many red shapes") but a shape in the plural ("how
    many circles"): with the plural in the cell, both counts match the cell directly, and the lookup
    by shape gets as much practice as the lookup by colour."""
    cell_words = {w for cell in shapes.CELLS for w in cell.split()}
    words = cell_words | set(shapes.SIZES + shapes.COLORS + shapes.SHAPES) | {"empty"}
    ids = {}
    for w in sorted(words):
        spaced, bare = tok.encode(" " + w), tok.encode(w)
        if len(spaced) != 1:
            raise ValueError(f"stand-in tokenizer: {' ' + w!r} is not a single token ({spaced}); "
                             "enlarge the vocabulary")
        plural = tok.encode(" " + w + "s") if w in shapes.SHAPES else []
        ids[w] = spaced + (bare if len(bare) == 1 else []) + (plural if len(plural) == 1 else [])
    return ids


def soft_scene(objects, words):
    """An image as 9 "soft words", one per grid cell in the order of the ViT's patches. A soft word
    is a list of token ids whose embeddings are *summed* into one input vector: the cell's name and
    what is in it ("top left large red circle", "center empty"). The LLM learns to read these sums,
    and stage 1 must teach the projector to produce such vectors from pixels: an image becomes words
    the LLM already knows."""
    cells = [name.split() + ["empty"] for name in shapes.CELLS]
    for o in objects:
        cells[o["cell"]] = shapes.CELLS[o["cell"]].split() + [o["size"], o["color"], o["shape"]]
    return [[i for w in cell for i in words[w]] for cell in cells]


def scene_key(objects):
    return tuple(sorted((o["cell"], o["shape"], o["color"], o["size"]) for o in objects))


def soft_document(ids, labels, objects, words):
    """A document for the stand-in LLM: (ids to sum, label) per position. Text positions hold one
    token id; the image placeholder becomes the scene's 9 soft words, which are input only (never a
    target)."""
    doc = []
    for i, label in zip(ids, labels):
        if i == IMAGE_TOKEN_INDEX:
            doc += [(cell, IGNORE_INDEX) for cell in soft_scene(objects, words)]
        else:
            doc += [([i], label)]
    return doc


def lm_documents(data_dir, tok, n, seed=0):
    """n pretraining documents, each about a freshly drawn scene (the data set's generator, so
    unlimited and never memorised; a scene equal to a held-out image, test or validation, is
    skipped): 10% a caption in stage 1's `plain` template, 80% a chatml conversation as in stage 2
    (LM_DESCRIBE of them opening with a caption), 10% a text-only chat (the data set's general
    questions). Trained as a chat model is: the targets are the replies (captions, answers and their
    end tokens, as tokenize_conversation marks them), the questions are only read. "Is there a
    ...?" asks about near misses (hard=True: a red square when there is a red circle), which a
    colour-only or shape-only match gets wrong; without them the LLM does not learn to match both.
    A conversation asks LM_TURNS questions about its scene, more than stage 2's 2 to 4: the scene's 9
    positions are read once for more answers; never the same question twice, since a repeat is
    answered by copying the earlier answer, not by reading the scene."""
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    held_out = {scene_key(m["objects"]) for m in meta["images"] if m["split"] != "train"}
    words, rng, docs = attribute_words(tok), random.Random(seed), []
    # tokenize_conversation's pieces, each text encoded once: the template's and the questions'
    # texts repeat in nearly every document
    encode = functools.cache(tok.encode)
    while len(docs) < n:
        kind, objects = rng.random(), None
        if kind < 0.1:
            facts = rng.sample(shapes.TEXT_FACTS, rng.randint(1, 2))
            conversation, template = shapes.chat_turns(facts), "chatml"
        else:
            objects = shapes.random_objects(rng)
            if scene_key(objects) in held_out:
                continue
            if kind < 0.2:
                turns = [("", shapes.caption(objects))]
                conversation, template = shapes.chat_turns(turns, image=True), "plain"
            else:
                qas = shapes.random_questions(objects, rng, n_turns=LM_TURNS, hard=True,
                                              describe=LM_DESCRIBE, distinct=True)
                conversation, template = shapes.chat_turns(qas, image=True), "chatml"
        pieces = data.conversation_pieces(conversation, tok, template)
        ids, labels = data.assemble(pieces, [encode(p) for p, _ in pieces if isinstance(p, str)])
        # every document ends with a trained end token: the model learns where text stops
        docs.append(soft_document(ids + [tok.eos_id], labels + [tok.eos_id], objects, words))
    return docs


def iter_texts(path):
    """Every message of a data file, without the image tag: the tokenizer's training text."""
    for s in data.load_samples(path):
        for t in s["conversations"]:
            yield t["value"].replace(data.IMAGE_TAG, "").strip()


def train_tokenizer(texts, path, vocab_size):
    """A byte-level BPE (as GPT-2, Llama 3, Qwen2): any string can be encoded, frequent words become
    one token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if is_main():  # under torchrun every process trains the same tokenizer, and process 0 writes it
        os.makedirs(path, exist_ok=True)
        tok.save(os.path.join(path, "tokenizer.json"))
        eot = SPECIAL[0]
        # as SmolLM2 / Qwen2: no BOS is prepended
        write_json(os.path.join(path, "tokenizer_config.json"), {
            "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "bos_token": eot,
            "eos_token": eot, "pad_token": eot, "model_max_length": LM["max_position_embeddings"]})
    barrier()
    return data.load_tokenizer(path)


def pad_documents(docs):
    """A batch of documents, right-padded: words (B, T, W) with -1 where a position has fewer ids to
    sum, labels (B, T), attention_mask (B, T). One document per row, unlike nanoGPT's packed blocks:
    a question must be answered from its own scene, not from the one before it in the block. Built
    column by column, since this runs before every step: a text position holds one id, so only the
    9 soft words of a scene need a row of their own."""
    T, W = max(len(d) for d in docs), max(len(ids) for d in docs for ids, _ in d)
    words = np.full((len(docs), T, W), -1, dtype=np.int64)
    labels = np.full((len(docs), T), IGNORE_INDEX, dtype=np.int64)
    for b, d in enumerate(docs):
        words[b, :len(d), 0] = [ids[0] for ids, _ in d]
        labels[b, :len(d)] = [label for _, label in d]
        for t, (ids, _) in enumerate(d):
            if len(ids) > 1:
                words[b, t, :len(ids)] = ids
    words = torch.from_numpy(words)
    return dict(words=words, labels=torch.from_numpy(labels), attention_mask=(words[..., 0] >= 0).long())


def soft_embed(lm, words):
    """(B, T, width) ids -> (B, T, D) input embeddings: the sum of each position's token embeddings,
    a "bag of words" (embedding_bag sums them without materialising the (B, T, width, D) gather; -1
    weighs 0)."""
    B, T, W = words.shape
    flat = words.view(B * T, W)
    weight = lm.model.embed_tokens.weight
    E = F.embedding_bag(flat.clamp(min=0), weight, per_sample_weights=(flat >= 0).to(weight.dtype),
                        mode="sum")
    return E.view(B, T, -1)


def lm_loss(model, batch):
    """Summed cross-entropy of the next token where one is trained (lm_head runs at those positions
    only), the number of targets and of positions. model may be a DDP wrapper: the forward goes
    through it, the embedding and lm_head are the wrapped model's."""
    lm = unwrap(model)
    h = model(inputs_embeds=soft_embed(lm, batch["words"]),
              attention_mask=padding_mask(batch["attention_mask"], only_real=True), hidden=True)  # (B, T, D)
    return *trained_cross_entropy(h, batch["labels"], lm.lm_head), batch["labels"].numel()


@torch.no_grad()
def read_scenes(lm, tok, prompts, max_new_tokens):
    """The stand-in LLM's greedy replies to prompts given as soft documents, all in one batch:
    left-padded (a position with no id to sum weighs nothing and is masked), with a KV cache."""
    T = max(map(len, prompts))
    batch = pad_documents([[([-1], IGNORE_INDEX)] * (T - len(p)) + p for p in prompts])
    device = lm.lm_head.weight.device
    ends = [tok.token_to_id("<|im_end|>"), tok.eos_id]
    training = lm.training
    tokens = torch.stack(list(lm.eval().stream(soft_embed(lm, batch["words"].to(device)),
                                               attention_mask=batch["attention_mask"].to(device),
                                               max_new_tokens=max_new_tokens, eos_token_id=ends)), dim=1)
    lm.train(training)
    replies = []
    for row in tokens.tolist():  # each row up to its first end token
        replies.append(tok.decode(row[:next((k for k, t in enumerate(row) if t in ends), len(row))]))
    return [r.strip() for r in replies]


def reading_accuracy(lm, tok, data_dir, split="test"):
    """(questions, descriptions): the stand-in LLM's exact match on a held-out split ("test" or
    "val") with each scene given as soft words, what LLaVA could reach with a perfect projector: the
    split's questions (one per image; {"all": share, and the share per question type}), and
    "Describe the image." asked of each of its images."""
    images = json.load(open(os.path.join(data_dir, "meta.json")))["images"]
    meta = {m["image"]: m["objects"] for m in images}
    words = attribute_words(tok)

    def correct(conversations, objects, max_new_tokens):
        prompts = []
        for turns, objs in zip(conversations, objects):
            ids = data.build_prompt(turns[:-1], tok, "chatml")
            prompts.append(soft_document(ids, [IGNORE_INDEX] * len(ids), objs, words))
        replies = read_scenes(lm, tok, prompts, max_new_tokens)
        return [r == turns[-1]["value"] for r, turns in zip(replies, conversations)]

    samples = data.load_samples(os.path.join(data_dir, f"{split}.json"))
    right = correct([s["conversations"] for s in samples], [meta[s["image"]] for s in samples], 8)
    questions = {"all": sum(right) / len(right)}
    for kind in sorted({s["type"] for s in samples}):
        group = [r for r, s in zip(right, samples) if s["type"] == kind]
        questions[kind] = sum(group) / len(group)
    scenes = [m["objects"] for m in images if m["split"] == split]
    describe = [shapes.chat_turns([("Describe the image.", shapes.caption(o))], image=True)
                for o in scenes]
    right = correct(describe, scenes, 64)
    return questions, sum(right) / len(right)


@contextlib.contextmanager
def frozen_gc():
    """Python's cycle collector paused while the block makes millions of small lists (the documents,
    which hold no cycles), and what was made moved out of its sight: each of its passes walks every
    object it tracks, and they would double the time of making the documents."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()  # later collections skip everything alive now
        if enabled:
            gc.enable()


def train_llm(data_dir, out_dir, device, n_docs=LM_DOCS, seed=0, **overrides):
    """The LLM stand-in, saved to out_dir/llm with its reading accuracy (reading.json). seed: the
    initialisation, the pretraining documents and their order."""
    path = os.path.join(out_dir, "llm")
    # the tokenizer learns the data set's words, and the chat template's (weighted so they become
    # whole tokens, as "assistant" after <|im_start|> is one token in Qwen2's tokenizer)
    texts = (list(iter_texts(os.path.join(data_dir, "instruct.json")))
             + list(iter_texts(os.path.join(data_dir, "captions.json"))))
    texts += ["system user assistant empty " + data.TEMPLATES["chatml"].system] * 2000
    texts += ["<|im_start|>system\n<|im_start|>user\n<|im_start|>assistant\n"] * 2000
    tok = train_tokenizer(texts, path, LM["vocab_size"])
    ids = {name: tok.token_to_id(name) for name in SPECIAL}
    cfg = LMConfig(**LM, bos_token_id=ids["<|endoftext|>"],
                   eos_token_id=[ids["<|endoftext|>"], ids["<|im_end|>"]])
    torch.manual_seed(seed)
    model = LanguageModel(cfg)
    for p in model.parameters():
        if p.dim() == 2:  # the embedding (tied with lm_head) and every projection
            nn.init.normal_(p, std=LM_INIT_STD)
    model.to(device)
    t0 = time.time()
    with frozen_gc():
        train_set = lm_documents(data_dir, tok, n_docs, seed=seed)
        eval_set = lm_documents(data_dir, tok, max(8, n_docs // 50), seed=f"eval-{seed}")  # other scenes
    n_params = sum(p.numel() for p in model.parameters())
    if is_main():
        print(f"llm stand-in: {len(train_set):,} documents ({sum(map(len, train_set)):,} positions) "
              f"made in {time.time() - t0:.1f}s, vocabulary {tok.vocab_size}, {n_params:,} parameters")
    tcfg = TrainConfig(**{**LM_TRAIN, "out_dir": os.path.join(out_dir, "llm_train"), "seed": seed,
                          **overrides})
    train(model, train_set, collate_fn=pad_documents, loss_fn=lm_loss, cfg=tcfg, eval_set=eval_set,
          lengths=[len(d) for d in train_set])
    if not is_main():  # under torchrun, process 0 scores and writes
        return path
    reading = {split: reading_accuracy(model, tok, data_dir, split=split) for split in ("val", "test")}
    (test, test_describe), (val, val_describe) = reading["test"], reading["val"]
    print(f"llm stand-in, given the scene as soft words: answers {test['all']:.1%} of the held-out test "
          f"questions and describes {test_describe:.1%} of their images ({val['all']:.1%} and "
          f"{val_describe:.1%} of the validation ones); validation questions by type: "
          + ", ".join(f"{k} {v:.1%}" for k, v in val.items() if k != "all"))
    model.cpu().save_pretrained(path)
    write_json(os.path.join(path, "generation_config.json"),
               {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                "pad_token_id": tok.pad_id})
    write_json(os.path.join(path, "reading.json"), {
        "seed": seed, "reading_accuracy": test["all"], "describe_accuracy": test_describe,
        "reading_by_type": test, "val_reading_accuracy": val["all"],
        "val_describe_accuracy": val_describe, "val_reading_by_type": val})
    return path


def ensure_shapes(data_dir=DATA_DIR, n_images=N_IMAGES):
    """The shapes data set in data_dir, made if missing; a data set made before the held-out
    conversations and the validation split existed gets those added (its other files unchanged)."""
    t0 = time.time()
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        counts = shapes.make_shapes(data_dir, n_images=n_images, size=IMAGE_SIZE)
    elif not os.path.exists(os.path.join(data_dir, "val_chat.json")):
        counts = shapes.make_held_out(data_dir, n_val=round(n_images * 0.1))
    else:
        return data_dir
    print(f"made the shapes data set in {data_dir} ({time.time() - t0:.1f}s): {counts}")
    return data_dir


def standins_dir(seed):
    """Where the stand-ins of a seed live: runs/standins for seed 0, runs/standins-seedN for the others."""
    return OUT_DIR if seed == 0 else f"{OUT_DIR}-seed{seed}"


def ensure_standins(data_dir=DATA_DIR, out_dir=None, force=False, seed=0, **overrides):
    """(vision_dir, llm_dir): the stand-ins of `seed`, trained first if they are not there yet
    (out_dir: default standins_dir(seed))."""
    out_dir = out_dir or standins_dir(seed)
    vision, llm = os.path.join(out_dir, "vision"), os.path.join(out_dir, "llm")
    seed_file = os.path.join(out_dir, "seed.json")
    if not force and os.path.exists(seed_file):
        with open(seed_file) as f:
            trained = json.load(f)["seed"]
        if trained != seed:
            raise InputError(f"{out_dir} holds the stand-ins of seed {trained}, not {seed}: "
                             "pass --force to retrain them, or another directory")
    _, _, device = init_distributed()
    if is_main():
        os.makedirs(out_dir, exist_ok=True)
        write_json(seed_file, {"seed": seed})  # first: a run killed half-way still says whose these are
    # under torchrun the processes train each stand-in together (train.py's DDP), and process 0 writes it
    for path, fn in ((vision, train_vision), (llm, train_llm)):
        if force or not os.path.exists(os.path.join(path, "model.safetensors")):
            t0 = time.time()
            if is_main():
                print(f"stage 0: training the {os.path.basename(path)} stand-in -> {path}")
            fn(data_dir, out_dir, device, seed=seed, **overrides)
            barrier()  # every process sees it on disk before going on
            if is_main():
                print(f"stage 0: {os.path.basename(path)} stand-in done in {time.time() - t0:.1f}s")
    return vision, llm


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="stage 0: pretrain the offline stand-in vision tower and LLM")
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--out-dir", help="default: runs/standins (seed 0), runs/standins-seedN (seed N)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the stand-ins' initialisations, pretraining documents and data order")
    parser.add_argument("--force", action="store_true", help="retrain even if the stand-ins exist")
    args = parser.parse_args(argv)
    ensure_standins(ensure_shapes(args.data_dir), out_dir=args.out_dir, force=args.force, seed=args.seed)


if __name__ == "__main__":
    command_line(main)
