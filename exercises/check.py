"""
Checks the classroom exercises against tinyllava's own behaviour, then plugs them into the real model.

    python exercises/check.py 1               # check your exercises/01_shifted_loss.py
    python exercises/check.py 3 5 6           # several
    python exercises/check.py all             # every exercise
    python exercises/check.py all --solutions # the reference solutions in exercises/solutions/ (CI runs this)

Each exercise is a list of checks run in order; the first failure stops that exercise and says what was
expected, what your function gave, and a hint. The exit code is 0 only if every exercise checked passes.
Everything runs on a CPU in seconds, on tiny random models built directly with tinyllava.
"""

import argparse
import contextlib
import importlib.util
import io
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: tinyllava.py, data.py
import tinyllava as tl  # noqa: E402

IGNORE, IMAGE = tl.IGNORE_INDEX, tl.IMAGE_TOKEN_INDEX

# -----------------------------------------------------------------------------
# The machinery: a registry of exercises and a checker that explains its verdicts


class Failed(Exception):
    pass


class Checker:
    """Prints PASS for each check that holds; the first that does not prints FAIL with details and stops."""

    def __init__(self):
        self.passed = 0

    def check(self, what, ok, expected=None, got=None, hint=None):
        if ok:
            print(f"  PASS  {what}")
            self.passed += 1
            return
        print(f"  FAIL  {what}")
        got = got() if callable(got) else got
        if expected is not None:
            print(f"        expected: {expected}")
        if got is not None:
            print(f"        got:      {got}")
        hint = hint() if callable(hint) else hint
        if hint:
            print(f"        hint:     {hint}")
        raise Failed(what)

    def close(self, what, got, want, atol=1e-5, hint=None):
        """Check that tensor `got` has want's shape and values (max absolute difference <= atol)."""
        if not torch.is_tensor(got):
            self.check(what, False, expected=f"a tensor of shape {tuple(want.shape)}", got=describe(got), hint=hint)
        if got.shape != want.shape:
            self.check(what, False, expected=f"shape {tuple(want.shape)}", got=f"shape {tuple(got.shape)}", hint=hint)
        diff = max_diff(got, want)
        self.check(what, diff <= atol, expected=f"max |difference| <= {atol:g}", got=f"max |difference| = {diff:.3g}", hint=hint)

    def show(self, text):
        print("\n".join("        " + line for line in text.splitlines()))


def describe(x):
    if torch.is_tensor(x):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:120]


def max_diff(a, b):
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        return math.inf
    d = (a.detach().double() - b.detach().double()).abs()
    return math.inf if d.isnan().any() else (d.max().item() if d.numel() else 0.0)


def diagnose(got, mistakes, default=None, atol=1e-5):
    """The hint of the first known mistake whose result `got` reproduces, else the default hint."""
    def hint():
        for wrong, why in mistakes:
            try:
                if max_diff(got, wrong() if callable(wrong) else wrong) <= atol:
                    return why
            except Exception:
                pass
        return default
    return hint


EXERCISES = {}


class Exercise:
    def __init__(self, number, module, function, title, check):
        self.number, self.module, self.function, self.title, self.check = number, module, function, title, check

    def path(self, solutions=False):
        return os.path.join(HERE, "solutions" if solutions else "", self.module + ".py")


def exercise(number, module, function, title):
    def register(check):
        EXERCISES[number] = Exercise(number, module, function, title, check)
        return check
    return register


def load_function(ex, solutions):
    path = ex.path(solutions)
    spec = importlib.util.spec_from_file_location(f"exercise_{ex.module}{'_solution' if solutions else ''}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, ex.function, None)
    if fn is None:
        raise AttributeError(f"{os.path.relpath(path)} defines no function `{ex.function}`")
    return fn


def run_one(ex, solutions=False, fn=None):
    """Check one exercise: the function in the student's file, the solution, or `fn` if given (tests)."""
    rel = os.path.relpath(ex.path(solutions), os.path.dirname(HERE))
    print(f"\nExercise {ex.number}: {ex.title}   ({rel if fn is None else fn.__qualname__})")
    c, t0 = Checker(), time.time()
    try:
        fn = load_function(ex, solutions) if fn is None else fn
        ex.check(fn, c)
    except Failed:
        return False
    except NotImplementedError:
        print(f"  TODO  not written yet: fill in `{ex.function}` in {rel} (it still raises NotImplementedError)")
        return False
    except Exception as e:
        where = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == ex.path(solutions)]
        at = f" at line {where[-1].lineno}: {where[-1].line}" if where else ""
        print(f"  FAIL  your code raised {type(e).__name__}: {e}{at}")
        if not where:
            print("        (the error was raised outside your file; the traceback follows)")
            traceback.print_exc(limit=-4, file=sys.stdout)
        return False
    print(f"  ===>  exercise {ex.number} passes ({c.passed} checks, {time.time() - t0:.1f}s)")
    return True


def run(numbers, solutions=False):
    """Check the given exercises; True if all pass."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast and leaves the other cores alone
    try:
        results = {n: run_one(EXERCISES[n], solutions) for n in numbers}
    finally:
        torch.set_num_threads(threads)
    if len(numbers) > 1:
        ok = [n for n, r in results.items() if r]
        print(f"\n{len(ok)} of {len(numbers)} exercises pass" + (f"; still to do: {[n for n in numbers if n not in ok]}" if len(ok) < len(numbers) else ""))
    return all(results.values())

# -----------------------------------------------------------------------------
# Tiny models and data, built directly with tinyllava (no download, no transformers)


VISION = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def tiny_model(seed=0, random_weights=False, **text):
    """A TinyLlava with a 16x16-pixel CLIP-style tower (4x4 patches -> 16 image tokens) and a 2-layer GQA decoder."""
    torch.manual_seed(seed)
    vision = tl.VisionTower(tl.VisionConfig(**VISION))
    lm = tl.LanguageModel(tl.LMConfig(**{**TEXT, **text}))
    with contextlib.redirect_stdout(io.StringIO()):  # TinyLlava prints its parameter table
        model = tl.TinyLlava(vision, lm, "mlp2x_gelu")
    if random_weights:  # larger weights than the training init, so that every term matters in a comparison
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name and p.dim() == 1 else 0.0))
    return model.eval()


def toy_batch(n=8, seed=0):
    """A batch in data.collate's format where the answer depends on the image: 4 classes of images,
    "<s> <image> what is it ? -> 10 + class </s>"; only the answer and the end token are trained."""
    patterns = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1234))
    cls = torch.arange(n) % 4
    pixel_values = patterns[cls] + 0.1 * torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    input_ids = torch.tensor([[1, IMAGE, 5, 6, 10 + int(c), 2] for c in cls])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, IGNORE, 10 + int(c), 2] for c in cls])
    return dict(input_ids=input_ids, labels=labels, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values)


def train(model, batch, steps, lr, loss_fn=tl.shifted_cross_entropy, params=None):
    """Plain AdamW steps on one batch (the model over-fits it); returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        embeds, mask, labels = model.merge_inputs(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"])
        loss = loss_fn(model.language_model(inputs_embeds=embeds, attention_mask=mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def gen(seed):
    return torch.Generator().manual_seed(seed)

# -----------------------------------------------------------------------------
# 1. The shifted cross-entropy


@exercise(1, "01_shifted_loss", "shifted_cross_entropy", "the shifted cross-entropy with -100")
def check_shifted_loss(loss_fn, c):
    g = gen(0)
    B, T, V = 3, 9, 17
    logits = torch.randn(B, T, V, generator=g).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :4] = IGNORE  # the prompt
    labels[2, 6:] = IGNORE  # padding
    want = tl.shifted_cross_entropy(logits, labels)
    got = loss_fn(logits, labels)
    c.check("returns a single number (a 0-dim tensor)", torch.is_tensor(got) and got.dim() == 0,
            expected="a 0-dim tensor", got=describe(got), hint="reduce to one number: the mean over the trained tokens")
    x, flat = logits.detach(), lambda t: t.reshape(-1, V)
    mistakes = [
        (lambda: F.cross_entropy(flat(x), labels.reshape(-1)),
         "this is the loss WITHOUT the shift: logits[:, t] is the model's guess for the NEXT token, so score logits[:, :-1] against labels[:, 1:]"),
        (lambda: F.cross_entropy(flat(x[:, 1:]), labels[:, :-1].reshape(-1)),
         "you shifted the wrong way round: keep logits[:, :-1] (predictions for positions 1..T-1) and labels[:, 1:]"),
        (lambda: F.cross_entropy(flat(x[:, :-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum") / labels[:, 1:].numel(),
         "you divided by every position; divide by the number of TRAINED positions (labels != -100)"),
        (lambda: F.cross_entropy(flat(x[:, :-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum") / (labels != IGNORE).sum(),
         "you counted the trained tokens before shifting; count them in labels[:, 1:], the targets actually scored"),
        (lambda: torch.stack([F.cross_entropy(x[b, :-1], labels[b, 1:], ignore_index=IGNORE) for b in range(B)]).mean(),
         "you averaged per sample and then over the batch; tinyllava (like LLaVA) averages over all trained tokens of the batch"),
    ]
    c.close("equals tinyllava.shifted_cross_entropy on random logits with a masked prompt and padding", got, want,
            hint=diagnose(got, mistakes, "check the shift (logits[:, :-1] vs labels[:, 1:]) and that -100 positions are left out"))
    c.check("the loss keeps its graph (gradients can flow back to the logits)", got.requires_grad,
            expected="a tensor with requires_grad=True", got="a tensor without a graph",
            hint="do not call .item(), .detach() or torch.no_grad() inside the loss")
    (grad_want,) = torch.autograd.grad(want, logits)
    (grad_got,) = torch.autograd.grad(got, logits)
    c.close("its gradient with respect to the logits equals the reference's", grad_got, grad_want)
    empty = loss_fn(logits.detach(), torch.full_like(labels, IGNORE))
    ok = torch.is_tensor(empty) and bool(torch.isfinite(empty)) and float(empty) == 0.0
    c.check("a batch without any trained token gives 0, not NaN", ok, expected="0.0", got=describe(empty),
            hint="0 trained tokens means 0 / 0: divide by the count clamped to at least 1")
    half = loss_fn(logits.detach().bfloat16(), labels)
    c.check("accepts bf16 logits (as under autocast) and stays accurate", max_diff(half.float(), tl.shifted_cross_entropy(logits.detach().bfloat16(), labels)) <= 1e-3,
            expected=f"{float(tl.shifted_cross_entropy(logits.detach().bfloat16(), labels)):.4f}", got=describe(half),
            hint="compute the cross-entropy in fp32: logits.float()")
    model, batch = tiny_model(), toy_batch()
    embeds, mask, spliced = model.merge_inputs(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask)
        c.close("on a real TinyLlava batch (16 image tokens spliced in) it equals the model's own loss",
                loss_fn(logits, spliced), model(**{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "labels")})[1])
    losses = train(model, batch, steps=25, lr=1e-2, loss_fn=loss_fn)
    c.check(f"training a tiny TinyLlava with your loss for 25 steps lowers it: {losses[0]:.3f} -> {losses[-1]:.3f}",
            losses[-1] < 0.5 * losses[0], expected="the final loss below half the first", got=f"{losses[0]:.3f} -> {losses[-1]:.3f}")

# -----------------------------------------------------------------------------
# 2. Labels for a multi-turn conversation (vicuna_v1)

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What color is the circle? ASSISTANT: The circle is red.",
    "USER: How many shapes are there? ASSISTANT: There are 3 shapes.",
    "USER: Is there a blue square? ASSISTANT: yes, a small blue square at the top left.",
    "What is the capital of France? Paris. What is 2 + 3? 5.",
]


def tiny_tokenizer(add_bos):
    """A byte-level BPE (GPT-2 / SmolLM2 style) trained here, wrapped as data.load_tokenizer would."""
    import data
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return data.Tokenizer(tok, bos_id=1, eos_id=2, pad_id=2, add_bos=add_bos)


CONVERSATIONS = {
    "one turn with an image": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "The circle is red."}],
    "three turns, the <image> tag written after the question": [
        {"from": "human", "value": "How many shapes are there?\n<image>"},
        {"from": "gpt", "value": "There are 3 shapes."},
        {"from": "human", "value": "Is there a blue square?"},
        {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "What color is the circle?"},
        {"from": "gpt", "value": "The circle is red."}],
    "text only, with its own system prompt": [
        {"from": "system", "value": "Answer in one word."},
        {"from": "human", "value": "What is the capital of France?"},
        {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "What is 2 + 3?"},
        {"from": "gpt", "value": "5."}],
}


@exercise(2, "02_conversation_labels", "tokenize_vicuna", "labels for a multi-turn conversation (vicuna_v1)")
def check_conversation_labels(fn, c):
    import data

    for add_bos in (False, True):
        tok = tiny_tokenizer(add_bos)
        kind = "a tokenizer that adds BOS (Llama-like)" if add_bos else "a tokenizer without BOS (SmolLM2-like)"
        for name, conv in CONVERSATIONS.items():
            want_ids, want_labels = data.tokenize_conversation([dict(t) for t in conv], tok, "vicuna_v1")
            out = fn([dict(t) for t in conv], tok)
            ok = isinstance(out, tuple) and len(out) == 2
            c.check(f"[{name}] returns (input_ids, labels)", ok, expected="a tuple of two lists", got=describe(out))
            ids, labels = [[int(i) for i in x] for x in out]
            c.check(f"[{name}] input_ids and labels have the same length", len(ids) == len(labels),
                    expected="equal lengths (labels are aligned with the ids; the model shifts them)", got=f"{len(ids)} ids, {len(labels)} labels")
            c.check(f"[{name}] every label is its token's id or -100", all(lab in (i, IGNORE) for i, lab in zip(ids, labels)),
                    expected="labels[t] == input_ids[t] (trained) or -100 (masked)",
                    got=lambda: next(f"position {t}: id {i}, label {lab}" for t, (i, lab) in enumerate(zip(ids, labels)) if lab not in (i, IGNORE)),
                    hint="do not shift the labels yourself: shifted_cross_entropy does it")
            trained = lambda i, lab: tok.decode([t for t, x in zip(i, lab) if x != IGNORE])  # noqa: E731
            c.check(f"[{name}] exactly the answers and their </s> are trained", trained(ids, labels) == trained(want_ids, want_labels),
                    expected=repr(trained(want_ids, want_labels)), got=repr(trained(ids, labels)),
                    hint="train each answer ' {answer}' and the EOS id after it; everything else (system, USER: ..., ASSISTANT:, <image>) is -100")
            whole = tok.encode(data.TEMPLATES["vicuna_v1"].system + " ")  # the system text tokenized as a piece
            if ids != want_ids:
                t = next((k for k, (a, b) in enumerate(zip(ids, want_ids)) if a != b), min(len(ids), len(want_ids)))
                if add_bos and (not ids or ids[0] != tok.bos_id):
                    hint = f"this tokenizer has add_bos=True: start with tokenizer.bos_id ({tok.bos_id}), untrained"
                elif not add_bos and ids and ids[0] == tok.bos_id:
                    hint = "this tokenizer has add_bos=False: do not prepend a BOS"
                elif IMAGE in want_ids and IMAGE not in ids:
                    hint = "'<image>' must become the single id -200 (split the text on '<image>'), not be tokenized as text"
                elif ids[:len(whole) + add_bos] != want_ids[:len(whole) + add_bos] and ids[add_bos:add_bos + len(whole)] != whole:
                    hint = "tokenize piece by piece exactly as the statement lists them (the system prompt plus its space is one piece)"
                else:
                    hint = "tokenize each piece on its own (merging across pieces changes the tokens); see the statement's list of pieces"
                c.check(f"[{name}] input_ids equal data.tokenize_conversation's with {kind}", False,
                        expected=f"{len(want_ids)} ids; at position {t}: {want_ids[t:t + 6]} = {tok.decode([i for i in want_ids[t:t + 6] if i >= 0])!r}",
                        got=f"{len(ids)} ids; at position {t}: {ids[t:t + 6]} = {tok.decode([i for i in ids[t:t + 6] if i >= 0])!r}", hint=hint)
            c.check(f"[{name}] input_ids and labels equal data.tokenize_conversation's with {kind}", labels == want_labels,
                    expected=data.render_mask(want_ids, want_labels, tok), got=data.render_mask(ids, labels, tok))
    conv = CONVERSATIONS["three turns, the <image> tag written after the question"]
    ids, labels = fn([dict(t) for t in conv], tok)
    print("  the mask viewer (python data.py show) on your multi-turn sample, [trained] tokens in brackets:")
    c.show(data.render_mask(list(ids), list(labels), tok))

# -----------------------------------------------------------------------------
# 3. Splicing image features at the -200 placeholder


def splice_cases():
    """(description, input_ids, attention_mask, labels) covering what the training and generation paths meet."""
    P = 0  # pad id
    ids = torch.tensor([[1, 7, 8, IMAGE, 9, 10, 11]])
    yield "one sample, the image in the middle, no mask, no labels", ids, None, None
    ids = torch.tensor([[1, IMAGE, 5, 6, 20, 21, 2],
                        [1, 5, 6, 22, 2, P, P],  # text only, right-padded
                        [1, IMAGE, 5, 23, 2, P, P]])  # an image, right-padded
    mask = (torch.arange(7) < torch.tensor([[7], [5], [5]])).long()
    labels = torch.where((ids >= 20) | (ids == 2), ids, IGNORE)  # the answer and its end token are trained
    yield "a right-padded training batch with labels and a text-only sample", ids, mask, labels
    ids = torch.tensor([[P, P, 1, IMAGE, 5, 6], [1, 7, IMAGE, 5, 6, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    yield "a left-padded generation batch (no labels)", ids, mask, None
    ids = torch.tensor([[1, IMAGE, 5, IMAGE, 6, 2]])
    yield "two images in one sample", ids, None, torch.where(ids > 0, ids, IGNORE)
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2]])
    yield "a batch without any image", ids, torch.ones_like(ids), ids.clone()


@exercise(3, "03_image_splice", "merge_inputs", "splicing image features at the -200 placeholder")
def check_image_splice(fn, c):
    model = tiny_model(random_weights=True)
    embed = model.language_model.model.embed_tokens
    N = model.vision_tower.num_tokens
    g = gen(3)
    for name, ids, mask, labels in splice_cases():
        n_img = int((ids == IMAGE).sum())
        pixels = torch.randn(n_img, 3, 16, 16, generator=g) if n_img else None
        with torch.no_grad():
            want = model.merge_inputs(ids, pixels, mask, labels)
            feats = model.encode_images(pixels) if n_img else None
            got = fn(ids, feats, embed, mask, labels)
        c.check(f"[{name}] returns (embeds, attention_mask, labels)", isinstance(got, tuple) and len(got) == 3,
                expected="a tuple of 3", got=describe(got))
        e, m, lab = got
        T2 = want[0].size(1)
        shape_hint = None
        if torch.is_tensor(e) and e.dim() == 3:
            if e.size(1) == T2 + n_img:
                shape_hint = "the -200 placeholder itself must disappear: it is REPLACED by the N image vectors"
            elif e.size(1) == ids.size(1):
                shape_hint = f"the sequence must grow: each -200 becomes N = {N} vectors"
        c.check(f"[{name}] embeddings have shape (B, T - n_images + n_images * N, D) = {tuple(want[0].shape)}",
                torch.is_tensor(e) and e.shape == want[0].shape, expected=tuple(want[0].shape), got=describe(e), hint=shape_hint)
        side = None
        if torch.is_tensor(m) and m.shape == want[1].shape and not torch.equal(m, want[1]):
            side = "keep the padding on the side where the input has it: right for training, left for generation (a left-padded row must end with its last real token)"
        c.check(f"[{name}] the attention mask marks the real positions", torch.is_tensor(m) and torch.equal(m.long(), want[1].long()),
                expected=want[1].tolist(), got=m.tolist() if torch.is_tensor(m) else describe(m), hint=side)
        if labels is None:
            c.check(f"[{name}] labels stay None when none are given", lab is None, expected="None", got=describe(lab))
        else:
            hint = "every image position gets -100 (there is nothing to predict there); padding too"
            c.check(f"[{name}] labels: -100 at the image positions and padding, the text labels moved along", torch.is_tensor(lab) and torch.equal(lab, want[2]),
                    expected=want[2].tolist(), got=lab.tolist() if torch.is_tensor(lab) else describe(lab), hint=hint)
        c.close(f"[{name}] embeddings equal TinyLlava.merge_inputs's", e, want[0],
                hint="text positions hold embed_tokens(id); image k's N vectors go where the k-th -200 stands (counting row by row)")
    # plug it into the model: training loss and greedy generation must not change
    student = lambda ids, pix=None, mask=None, labels=None: fn(ids, model.encode_images(pix) if pix is not None else None, embed, mask, labels)  # noqa: E731
    _, ids, mask, labels = list(splice_cases())[1]
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        want_loss = model(ids, pixels, mask, labels)[1]
        _, ids_g, mask_g, _ = list(splice_cases())[2]
        want_gen = model.generate(ids_g, pixels, mask_g, max_new_tokens=5)
        model.merge_inputs = student
        try:
            got_loss = model(ids, pixels, mask, labels)[1]
            got_gen = model.generate(ids_g, pixels, mask_g, max_new_tokens=5)
        finally:
            del model.merge_inputs
    c.close("plugged into TinyLlava.forward: the training loss is unchanged", got_loss, want_loss)
    c.check("plugged into TinyLlava.generate: the greedy tokens are unchanged", torch.equal(got_gen, want_gen),
            expected=want_gen.tolist(), got=got_gen.tolist())

# -----------------------------------------------------------------------------
# 4. The freezing policy of the two stages


PARTS = ("vision_tower", "multi_modal_projector", "language_model")
POLICY = {"pretrain": {"multi_modal_projector"}, "finetune": {"multi_modal_projector", "language_model"}}


@exercise(4, "04_freezing", "set_stage", "the freezing policy of stage 1 and stage 2")
def check_freezing(fn, c):
    try:
        from train_pt import freeze as pipeline_freeze
    except ImportError:
        pipeline_freeze = None
    model = tiny_model()
    for stage in ("pretrain", "finetune", "pretrain"):
        fn(model, stage)
        for part in PARTS:
            flags = {p.requires_grad for p in getattr(model, part).parameters()}
            want = part in POLICY[stage]
            hint = None
            if getattr(getattr(model, part), "requires_grad", None) is False and flags != {False}:
                hint = f"`model.{part}.requires_grad = False` only adds an attribute to the module; use .requires_grad_(False), which sets every parameter"
            elif len(flags) > 1:
                hint = "some parameters of this part are trainable and some are not: set every parameter of the part"
            c.check(f"[{stage}] {part}: {'trainable' if want else 'frozen'}", flags == {want},
                    expected=f"requires_grad={want} on every parameter", got=f"requires_grad values {sorted(flags)}", hint=hint)
        if pipeline_freeze is not None:  # the training pipeline's own policy (train_pt.freeze), when it is there
            ref = tiny_model()
            with contextlib.redirect_stdout(io.StringIO()):
                pipeline_freeze(ref, {"pretrain": ["projector"], "finetune": ["projector", "llm"]}[stage])
            want = {n: p.requires_grad for n, p in ref.named_parameters()}
            c.check(f"[{stage}] the same trainable parameters as the training pipeline's train_pt.freeze",
                    want == {n: p.requires_grad for n, p in model.named_parameters()})
        table = tl.parameter_table(model)
        print("        the parameter table (tinyllava.parameter_table):")
        c.show(table)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, toy_batch(), steps=1, lr=1e-2)
        for part in PARTS:
            changed = [n for n, p in getattr(model, part).named_parameters() if not torch.equal(p, before[f"{part}.{n}"])]
            if part in POLICY[stage]:
                c.check(f"[{stage}] one AdamW step changes the {part}", len(changed) > 0, expected="some weights changed", got="none changed")
            else:
                c.check(f"[{stage}] one AdamW step (weight decay 0.1) leaves the {part} bit-identical", not changed,
                        expected="every weight equal, bit for bit", got=f"{len(changed)} tensors changed, e.g. {changed[:2]}")
    try:
        fn(model, "stage3")
        raised = None
    except Exception as e:
        raised = e
    c.check("an unknown stage name raises ValueError", isinstance(raised, ValueError), expected="ValueError",
            got=describe(raised) if raised else "no error", hint="a typo in a stage name must not silently train the wrong parts")

# -----------------------------------------------------------------------------
# 5. Rotary position embeddings


def rope_interleaved(x, positions, theta):
    hs = x.size(-1)
    inv = 1.0 / theta ** (torch.arange(0, hs, 2).float() / hs)
    a = positions.float()[..., None] * inv  # (B, T, hs/2)
    cos, sin = a.cos()[:, None], a.sin()[:, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@exercise(5, "05_rope", "apply_rope", "rotary position embeddings")
def check_rope(fn, c):
    ref = lambda x, pos, theta: tl.apply_rope(x, *tl.rope_cos_sin(pos, x.size(-1), theta, x.dtype))  # noqa: E731
    g = gen(5)
    B, nh, T, hs = 2, 3, 6, 8
    x = torch.randn(B, nh, T, hs, generator=g)
    pos = torch.arange(T).expand(B, T)
    got = fn(x, pos, 10000.0)
    c.check("keeps the shape (B, n_heads, T, head_dim) and dtype", torch.is_tensor(got) and got.shape == x.shape and got.dtype == x.dtype,
            expected=f"{tuple(x.shape)}, {x.dtype}", got=describe(got))
    c.close("position 0 is left unchanged (a rotation by angle 0)", got[:, :, 0], x[:, :, 0])
    c.close("it is a rotation: the length of every vector is unchanged", got.norm(dim=-1), x.norm(dim=-1), 1e-4,
            hint="each pair (x_i, x_j) becomes (x_i cos - x_j sin, x_i sin + x_j cos)")
    pos = torch.randint(0, 50, (B, T), generator=g)
    for theta in (10000.0, 500.0):
        got = fn(x, pos, theta)
        mistakes = [(lambda: rope_interleaved(x, pos, theta),
                     "you paired neighbours (x0, x1), (x2, x3), ...; the Hugging Face layout (which the checkpoints' q/k weights assume) pairs x_i with x_{i + head_dim/2}"),
                    (lambda: ref(x, -pos, theta), "you rotated the wrong way: the sign of sin is flipped"),
                    (lambda: tl.apply_rope(x, *[t.float() for t in rope_cos_sin_wrong_freq(pos, hs, theta)]),
                     "the frequencies are off: frequency i is theta ** (-2i / head_dim) for i = 0 .. head_dim/2 - 1")]
        c.close(f"equals tinyllava's rope on random vectors at random positions (theta={theta:g})", got, ref(x, pos, theta), 1e-5,
                hint=diagnose(got, mistakes, "angle = position * theta ** (-2i / head_dim); pair x_i with x_{i + head_dim/2}"))
    q, k = torch.randn(1, 1, 1, hs, generator=g), torch.randn(1, 1, 1, hs, generator=g)
    dots = [(fn(q, torch.tensor([[m]]), 10000.0) * fn(k, torch.tensor([[n]]), 10000.0)).sum().item() for m, n in ((5, 2), (12, 9), (40, 37))]
    c.check("q.k depends only on the distance between the positions (5-2, 12-9, 40-37 give the same score)",
            max(dots) - min(dots) < 1e-4, expected="three equal scores", got=[round(d, 5) for d in dots])
    # plugged into the language model: logits with left padding (positions are not 0..T-1), and cached generation
    model = tiny_model(random_weights=True)
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want_logits = model.language_model(ids, attention_mask=mask)
        want_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6)
        # the model calls rope_cos_sin(positions, head_dim, theta, dtype) then apply_rope(q, cos, sin):
        # hand the positions and theta through, and let your function do the rest
        originals = tl.rope_cos_sin, tl.apply_rope

        def plugged(x, positions, theta):  # your function runs with tinyllava's originals in place
            with patched(tl, "rope_cos_sin", originals[0]), patched(tl, "apply_rope", originals[1]):
                return fn(x, positions, theta)
        with patched(tl, "rope_cos_sin", lambda p, hs, theta, dtype: (p, theta)), patched(tl, "apply_rope", plugged):
            got_logits = model.language_model(ids, attention_mask=mask)
            got_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    c.close("plugged into the language model: logits of a left-padded batch are unchanged", got_logits, want_logits, 1e-4)
    c.check("plugged into generation with a KV cache: the greedy tokens are unchanged", torch.equal(got_gen, want_gen),
            expected=want_gen.tolist(), got=got_gen.tolist())


def rope_cos_sin_wrong_freq(positions, hs, theta):
    inv = 1.0 / theta ** (torch.arange(0, hs // 2).float() / hs)
    a = torch.cat([positions.float()[..., None] * inv] * 2, dim=-1)
    return a.cos(), a.sin()

# -----------------------------------------------------------------------------
# 6. Grouped-query attention with a KV cache


def attention_ref(q, k, v, past_k=None, past_v=None):
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    T, S = q.size(2), k.size(2)
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # query i sits at position S - T + i
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), k, v


@exercise(6, "06_gqa_kv_cache", "attention", "grouped-query attention with a KV cache")
def check_attention(fn, c):
    g = gen(6)
    B, nh, n_kv, hs = 2, 4, 2, 8
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(B, nh, 5, hs), r(B, n_kv, 5, hs), r(B, n_kv, 5, hs)
    out = fn(q, k, v)
    c.check("returns (y, keys, values)", isinstance(out, tuple) and len(out) == 3, expected="a tuple of 3", got=describe(out))
    y = out[0]
    want = attention_ref(q, k, v)[0]
    rep = lambda t: t.repeat(1, nh // n_kv, 1, 1)  # noqa: E731
    mistakes = [(lambda: F.scaled_dot_product_attention(q, rep(k), rep(v), is_causal=True),
                 "query head h must use key/value head h // (n_heads / n_kv_heads): heads 0,1 share kv head 0. "
                 "tensor.repeat tiles the heads (0,1,0,1); repeat_interleave gives (0,0,1,1)"),
                (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), "a decoder is causal: position i may only attend to positions <= i"),
                (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=1.0), "scale the scores by 1 / sqrt(head_dim)")]
    c.close("no cache: equals causal attention with kv heads shared by groups of query heads", y, want,
            hint=diagnose(y, mistakes, "scores = q @ k^T / sqrt(head_dim), causal mask, softmax, @ v"))
    c.check("no cache: returns the keys and values to cache (here: the new ones)", max_diff(out[1], k) == 0 and max_diff(out[2], v) == 0,
            expected=f"keys/values of shape {tuple(k.shape)}", got=f"{describe(out[1])} / {describe(out[2])}")
    P = 3
    pk, pv = r(B, n_kv, P, hs), r(B, n_kv, P, hs)
    for T, what in ((1, "one new token (decoding)"), (4, "a chunk of 4 new tokens after 3 cached ones")):
        q2, k2, v2 = r(B, nh, T, hs), r(B, n_kv, T, hs), r(B, n_kv, T, hs)
        y2, kk, vv = fn(q2, k2, v2, pk, pv)
        want, want_k, want_v = attention_ref(q2, k2, v2, pk, pv)
        top_left = F.scaled_dot_product_attention(q2, torch.cat([pk, k2], 2), torch.cat([pv, v2], 2), is_causal=True, enable_gqa=True)
        c.close(f"with a cache, {what}: equals attention over cached + new keys", y2, want,
                hint=diagnose(y2, [(top_left, "the new queries are the LAST T positions: query i sits at position P + i and sees keys 0..P+i. "
                                              "(SDPA's is_causal=True aligns the mask top-left, which is wrong when T < S)")],
                              "concatenate past and new keys/values along the time axis (dim 2) before attending"))
        c.check(f"with a cache, {what}: returns past + new keys/values in order", max_diff(kk, want_k) == 0 and max_diff(vv, want_v) == 0,
                expected=f"torch.cat([past, new], dim=2), shape {tuple(want_k.shape)}", got=describe(kk))
    for n in (1, nh):
        k1, v1 = r(B, n, 5, hs), r(B, n, 5, hs)
        c.close(f"works with {n} key/value head(s) ({'multi-query' if n == 1 else 'plain multi-head'} attention)", fn(q, k1, v1)[0], attention_ref(q, k1, v1)[0])
    # plugged into the real decoder: tinyllava's attention, with your function in place of SDPA + KVCache.update
    model = tiny_model(random_weights=True)
    lm = model.language_model
    ids = torch.randint(0, TEXT["vocab_size"], (2, 9), generator=g)
    with torch.no_grad():
        full_ref = lm(ids)
        want_gen = model.generate(ids[:, :5], max_new_tokens=6)
        with patched(tl.LlamaAttention, "forward", student_attention_forward(fn)):
            full = lm(ids)
            c.close("plugged into the decoder: full-sequence logits are unchanged", full, full_ref, 1e-4)
            cache = tl.KVCache(lm.config, 2, 9, ids.device, torch.float32)
            steps = [lm(ids[:, :5], cache=cache), lm(ids[:, 5:8], cache=cache), lm(ids[:, 8:], cache=cache)]
            c.close("cached == uncached: prefill 5, then a chunk of 3, then 1 token give the full forward's logits",
                    torch.cat(steps, 1), full_ref, 1e-4, hint="the cache must hold keys/values of every earlier position, in order")
            got_gen = model.generate(ids[:, :5], max_new_tokens=6)
    c.check("greedy generation with the KV cache gives the same tokens as tinyllava", torch.equal(got_gen, want_gen),
            expected=want_gen.tolist(), got=got_gen.tolist())


def student_attention_forward(fn):
    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        past = 0 if cache is None else cache.pos
        if isinstance(mask, torch.Tensor) and not torch.equal(mask, tl.attention_mask_4d(torch.ones(B, past + T), T, past)):
            raise RuntimeError("checker: the exercise has no padding mask, so it is only plugged into unpadded batches")
        q = tl.apply_rope(self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2), cos, sin)
        k = tl.apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)
        if past == 0:
            y, k_all, v_all = fn(q, k, v)
        else:
            y, k_all, v_all = fn(q, k, v, cache.k[self.layer_idx, :, :, :past], cache.v[self.layer_idx, :, :, :past])
        if cache is not None:  # tinyllava's cache is preallocated: write what the function returned back into it
            cache.k[self.layer_idx, :, :, : k_all.size(2)] = k_all
            cache.v[self.layer_idx, :, :, : v_all.size(2)] = v_all
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hs))
    return forward

# -----------------------------------------------------------------------------
# 7. LLaVA-1.5 'pad' preprocessing


def test_images():
    """Non-square RGB images with structure (a gradient and a bright square), plus a grey one and an RGBA one."""
    from PIL import Image

    def make(w, h, mode="RGB"):
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rgb = torch.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // (w + h)], -1)
        rgb[h // 4: h // 2, w // 4: w // 2] = torch.tensor([250, 250, 30])
        im = Image.fromarray(rgb.to(torch.uint8).numpy(), "RGB")
        return im.convert(mode) if mode != "RGB" else im
    return {"wide 40x24": make(40, 24), "tall 18x30": make(18, 30), "square 32x32": make(32, 32),
            "greyscale (mode L) 30x20": make(30, 20, "L"), "RGBA 20x28": make(20, 28, "RGBA")}


@exercise(7, "07_pad_preprocess", "preprocess_pad", "LLaVA-1.5 'pad' preprocessing and normalisation")
def check_pad(fn, c):
    import data
    from PIL import Image

    TOL = 0.02  # normalised units: allows rounding the pad colour, not a different recipe
    for name, image in test_images().items():
        for size, mean, std, enc in ((16, data.CLIP_MEAN, data.CLIP_STD, "CLIP"), (24, data.SIGLIP_MEAN, data.SIGLIP_STD, "SigLIP")):
            want = data.preprocess_image(image.copy(), size, mean, std, mode="pad")
            got = fn(image.copy(), size, mean, std)
            if not (torch.is_tensor(got) and got.shape == want.shape):
                hint = "channels first: (3, size, size), as the vision tower's Conv2d expects" if torch.is_tensor(got) and got.shape == (size, size, 3) else None
                c.check(f"[{name}, {enc}] returns a float tensor (3, {size}, {size})", False, expected=f"shape {tuple(want.shape)}", got=describe(got), hint=hint)
            w, h = image.size
            m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
            alt = lambda fill=None, paste=None, squash=False: pad_variant(image, size, mean, std, fill, paste, squash)  # noqa: E731
            mistakes = [(lambda: (want * s + m), "normalise: (pixel / 255 - mean) / std, per channel"),
                        (lambda: alt(fill=(0, 0, 0)), "pad with the MEAN colour (int(mean * 255) per channel), not black: after normalisation the padding is ~0, i.e. 'nothing'"),
                        (lambda: alt(paste=(0, 0)), "centre the image in the square: paste it at ((side - w) // 2, (side - h) // 2)"),
                        (lambda: alt(squash=True), "do not stretch the image to a square: pad it to a square first (side = max(w, h)), then resize"),
                        (lambda: pad_variant(image, size, mean, std, resample=Image.BILINEAR), "resize with bicubic interpolation (Image.BICUBIC), as the CLIP processor")]
            c.close(f"[{name}, {enc} {size}px] equals data.preprocess_image(..., mode='pad')", got, want, TOL,
                    hint=diagnose(got, mistakes, "pad to a centred square with the mean colour, resize (bicubic), /255, subtract mean, divide by std", atol=TOL))
    model = tiny_model(random_weights=True)
    im = test_images()["wide 40x24"]
    with torch.no_grad():
        want = model.encode_images(data.preprocess_image(im, 16, data.CLIP_MEAN, data.CLIP_STD)[None])
        got = model.encode_images(fn(im, 16, data.CLIP_MEAN, data.CLIP_STD)[None])
    c.close("plugged into the vision tower + projector: the image tokens are the same", got, want, 1e-3 * max(1.0, want.abs().max().item()))


def pad_variant(image, size, mean, std, fill=None, paste=None, squash=False, resample=None):
    import numpy as np
    from PIL import Image

    import data

    image = data.to_rgb(image)
    w, h = image.size
    if not squash:
        side = max(w, h)
        square = Image.new("RGB", (side, side), fill if fill is not None else tuple(int(x * 255) for x in mean))
        square.paste(image, paste if paste is not None else ((side - w) // 2, (side - h) // 2))
        image = square
    image = image.resize((size, size), resample if resample is not None else Image.BICUBIC)
    x = (np.asarray(image, dtype=np.float32) / 255.0 - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)

# -----------------------------------------------------------------------------
# 8. A token-reducing projector


class PooledProjector(tl.Projector):
    """mlp2x_gelu applied after a token-reducing function (n, N, Dv) -> (n, N', Dv)."""

    def __init__(self, pool, vision_dim, text_dim):
        super().__init__("mlp2x_gelu", vision_dim, text_dim)
        self.pool = pool

    def forward(self, x):
        return super().forward(self.pool(x))


def pooled_model(pool, seed=0):
    model = tiny_model(seed)
    torch.manual_seed(seed)
    model.multi_modal_projector = PooledProjector(pool, VISION["hidden_size"], TEXT["hidden_size"])
    return model


@exercise(8, "08_pooled_projector", "pool2x2", "a token-reducing projector: 2x2 average pooling")
def check_pool(fn, c):
    g = gen(8)
    x = torch.randn(3, 16, 5, generator=g)  # 3 images, a 4x4 grid of patches, 5 channels
    got = fn(x)
    c.check("(n, 16, D) -> (n, 4, D): four times fewer tokens", torch.is_tensor(got) and got.shape == (3, 4, 5), expected="shape (3, 4, 5)", got=describe(got))
    want = F.avg_pool2d(x.transpose(1, 2).reshape(3, 5, 4, 4), 2).flatten(2).transpose(1, 2)
    mistakes = [(lambda: x.reshape(3, 4, 4, 5).mean(2),
                 "you averaged 4 CONSECUTIVE tokens, i.e. 1x4 strips of a row; the tokens are a 4x4 grid in row-major order "
                 "(token r * side + c is row r, column c): pool 2x2 squares of that grid"),
                (lambda: want.reshape(3, 2, 2, 5).transpose(1, 2).reshape(3, 4, 5), "keep the pooled tokens in row-major order, like the patches"),
                (lambda: F.max_pool2d(x.transpose(1, 2).reshape(3, 5, 4, 4), 2).flatten(2).transpose(1, 2), "average, don't take the max")]
    c.close("each output token is the mean of a 2x2 square of the patch grid, in row-major order", got, want,
            hint=diagnose(got, mistakes, "reshape (n, N, D) -> (n, D, side, side), pool 2x2, and back"))
    x = torch.randn(2, 64, 3, generator=g)
    c.close("an 8x8 grid becomes 4x4", fn(x), F.avg_pool2d(x.transpose(1, 2).reshape(2, 3, 8, 8), 2).flatten(2).transpose(1, 2))
    for N, why in ((15, "not a square"), (9, "a 3x3 grid, odd side")):
        try:
            fn(torch.randn(1, N, 4))
            raised = None
        except Exception as e:
            raised = e
        c.check(f"{N} tokens ({why}) raises ValueError", isinstance(raised, ValueError), expected="ValueError",
                got=describe(raised) if raised else "no error", hint="check that N is a perfect square with an even side and raise ValueError otherwise")
    model, batch = pooled_model(fn), toy_batch()
    with torch.no_grad():
        embeds, _, _ = model.merge_inputs(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"])
    T = batch["input_ids"].size(1)
    c.check(f"plugged into TinyLlava: each image takes 4 positions instead of 16 (sequence {T - 1 + 16} -> {T - 1 + 4})",
            embeds.size(1) == T - 1 + 4, expected=T - 1 + 4, got=embeds.size(1))
    losses = train(model, batch, steps=30, lr=1e-2)
    c.check(f"a tiny TinyLlava with the pooled projector learns: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 30 steps",
            losses[-1] < 0.5 * losses[0], expected="the final loss below half the first", got=f"{losses[0]:.3f} -> {losses[-1]:.3f}")

# -----------------------------------------------------------------------------
# 9. Skipping stage 1: does the model look at the image?


@exercise(9, "09_skip_stage1", "image_gap", "ablation: skip stage 1 (the image-gap probe)")
def check_image_gap(fn, c):
    model, batch = tiny_model(), toy_batch()
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def ref():
        with torch.no_grad():
            return model(pixel_values=batch["pixel_values"], **args)[1].item(), model(pixel_values=batch["pixel_values"].roll(1, 0), **args)[1].item()
    out = fn(model, batch)
    c.check("returns two floats (loss with the right images, loss with shuffled images)",
            isinstance(out, tuple) and len(out) == 2 and all(isinstance(v, float) for v in out), expected="(float, float)", got=describe(out),
            hint="return plain Python floats: loss.item()")
    want = ref()
    c.check("matches the reference on an untrained model", max(abs(a - b) for a, b in zip(out, want)) < 1e-5,
            expected=tuple(round(v, 5) for v in want), got=tuple(round(v, 5) for v in out),
            hint="loss of TinyLlava(batch); then the same with pixel_values.roll(1, dims=0)")
    with torch.no_grad():
        for p in model.multi_modal_projector.parameters():
            p.zero_()
    real, shuffled = fn(model, batch)
    c.check("a model whose projector outputs zeros cannot see the image: gap = 0", abs(real - shuffled) < 1e-6,
            expected="equal losses", got=f"{real:.5f} vs {shuffled:.5f}")
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    fn(model, batch)
    c.check("leaves the model as it found it (weights and train/eval mode)", model.training and all(torch.equal(p, before[n]) for n, p in model.named_parameters()),
            expected="weights unchanged, model.training still True", got=f"model.training={model.training}",
            hint="evaluate under torch.no_grad() in eval mode, then restore the mode")
    model.vision_tower.requires_grad_(False)
    train(model, batch, steps=40, lr=1e-2)
    real, shuffled = fn(model, batch)
    c.check(f"after training on an image-dependent task the probe sees the image: {real:.3f} (right) vs {shuffled:.3f} (shuffled)",
            shuffled > real + 0.5, expected="shuffled loss clearly above the right-image loss", got=f"{real:.3f} vs {shuffled:.3f}")

# -----------------------------------------------------------------------------
# 10. LoRA for stage 2


@torch.no_grad()
def merge_lora(lm):
    """W' = W + scale * B @ A in every LoRA'd attention projection, then the plain Linear goes back in its
    place: the model is an ordinary checkpoint again (also used by study.py before saving)."""
    for layer in lm.model.layers:
        for name, mod in list(layer.self_attn.named_children()):
            if hasattr(mod, "lora_A"):
                mod.base.weight += mod.scale * mod.lora_B @ mod.lora_A
                setattr(layer.self_attn, name, mod.base)


@exercise(10, "10_lora", "add_lora", "stage 2 with LoRA on the LLM")
def check_lora(fn, c):
    model, batch = tiny_model(random_weights=True), toy_batch()  # large random weights stand in for a pretrained LLM
    lm = model.language_model
    base_weights = {n: p.detach().clone() for n, p in lm.named_parameters()}
    with torch.no_grad():
        before = model(**{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")})[0]
    params = fn(lm, rank=4, alpha=8)
    c.check("returns the list of LoRA parameters", isinstance(params, (list, tuple)) and all(isinstance(p, torch.nn.Parameter) for p in params),
            expected="a list of nn.Parameter", got=describe(params))
    L, D, Dq, Dkv = TEXT["num_hidden_layers"], TEXT["hidden_size"], TEXT["num_attention_heads"] * TEXT["head_dim"], TEXT["num_key_value_heads"] * TEXT["head_dim"]
    n_want = L * (4 * (D + Dq) + 4 * (D + Dkv))  # rank * (in + out) for q_proj and v_proj of each layer
    n_got = sum(p.numel() for p in params)
    c.check(f"rank 4 on q_proj and v_proj of {L} layers: {n_want:,} LoRA parameters", n_got == n_want, expected=n_want, got=n_got,
            hint="per wrapped Linear: A is (rank, in_features), B is (out_features, rank)")
    attn = lm.model.layers[0].self_attn
    for name in ("q_proj", "v_proj"):
        mod = getattr(attn, name)
        ok = all(hasattr(mod, a) for a in ("base", "lora_A", "lora_B", "scale"))
        c.check(f"layers.0.self_attn.{name} is wrapped, with .base, .lora_A, .lora_B, .scale", ok,
                expected="a module with attributes base, lora_A, lora_B, scale", got=type(mod).__name__)
    c.check("scale = alpha / rank", all(abs(getattr(attn, n).scale - 2.0) < 1e-9 for n in ("q_proj", "v_proj")), expected=2.0, got=attn.q_proj.scale)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    lora_names = {n for n, p in lm.named_parameters() if any(p is q for q in params)}
    c.check("in the LLM only the LoRA matrices are trainable", trainable == lora_names,
            expected=f"{len(lora_names)} trainable tensors (the LoRA ones)", got=f"{len(trainable)}, e.g. {sorted(trainable - lora_names)[:3]}",
            hint="freeze every pretrained weight of the LLM (requires_grad_(False)) before adding the LoRA matrices")
    with torch.no_grad():
        after = model(**{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")})[0]
    c.close("right after add_lora the model computes exactly what it computed before (B starts at zero)", after, before, 1e-6,
            hint="initialise lora_B with zeros (and lora_A randomly), so the update B @ A starts at 0")
    model.vision_tower.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    print("        stage 2 with LoRA (tinyllava.parameter_table):")
    c.show(tl.parameter_table(model))
    losses = train(model, batch, steps=30, lr=1e-2)
    c.check(f"stage 2 (projector + LoRA) learns: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 30 steps", losses[-1] < 0.5 * losses[0],
            expected="the final loss below half the first", got=f"{losses[0]:.3f} -> {losses[-1]:.3f}")
    names = {n.replace(".base.", ".") if ".base." in n else n: p for n, p in lm.named_parameters() if "lora_" not in n}
    changed = [n for n, w in base_weights.items() if n not in names or not torch.equal(names[n], w)]
    c.check("the pretrained LLM weights are bit-identical after training", not changed, expected="no change", got=f"{len(changed)} changed, e.g. {changed[:2]}",
            hint="keep the original Linear as .base and never hand its weight to the optimizer")
    c.check("the LoRA matrices did change", any(getattr(layer.self_attn, n).lora_B.abs().sum() > 0 for layer in lm.model.layers for n in ("q_proj", "v_proj")),
            expected="lora_B != 0 after training", got="all lora_B still zero")
    with torch.no_grad():
        want = model(**{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")})[0]
        merge_lora(lm)
        merged = model(**{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")})[0]
    c.close("merging W + scale * B @ A into the base weights gives the same logits (LoRA costs nothing at inference)", merged, want, 1e-5 * want.abs().max().item(),
            hint="forward must compute base(x) + scale * (x @ A^T @ B^T)")

# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description="check the tinyllava classroom exercises")
    parser.add_argument("exercises", nargs="+", help="exercise numbers, or 'all'")
    parser.add_argument("--solutions", action="store_true", help="check the reference solutions instead of your files")
    args = parser.parse_args(argv)
    numbers = sorted(EXERCISES) if args.exercises == ["all"] else []
    for a in args.exercises if not numbers else []:
        if not a.isdigit() or int(a) not in EXERCISES:
            parser.error(f"unknown exercise {a!r}; choose from {sorted(EXERCISES)} or 'all'")
        numbers.append(int(a))
    t0 = time.time()
    ok = run(numbers, args.solutions)
    print(f"({time.time() - t0:.1f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
