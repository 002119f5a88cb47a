"""Exercise 3: splicing image features at the -200 placeholder."""

import torch

from .framework import describe, exercise, gen
from .toy import IGNORE, IMAGE, tiny_model


def splice_cases():
    """(description, input_ids, attention_mask, labels): what the training and generation paths
    meet."""
    P = 0  # pad id
    ids = torch.tensor([[1, 7, 8, IMAGE, 9, 10, 11]])
    yield "one sample, the image in the middle, no mask, no labels", ids, None, None
    ids = torch.tensor([[1, IMAGE, 5, 6, 20, 21, 2],
                        [1, 5, 6, 22, 2, P, P],  # text only, right-padded
                        [1, IMAGE, 5, 23, 2, P, P]])  # an image, right-padded
    mask = (torch.arange(7) < torch.tensor([[7], [5], [5]])).long()
    # the answer and its end token are trained
    labels = torch.where((ids >= 20) | (ids == 2), ids, IGNORE)
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
        c.check(f"[{name}] returns (embeds, attention_mask, labels)",
                isinstance(got, tuple) and len(got) == 3, expected="a tuple of 3",
                got=describe(got))
        e, m, lab = got
        want_e, want_m, want_lab = want
        T2 = want_e.size(1)
        shape_hint = None
        if torch.is_tensor(e) and e.dim() == 3:
            if e.size(1) == T2 + n_img:
                shape_hint = ("the -200 placeholder itself must disappear: it is REPLACED by the N "
                              "image vectors")
            elif e.size(1) == ids.size(1):
                shape_hint = f"the sequence must grow: each -200 becomes N = {N} vectors"
        c.check(f"[{name}] embeddings have shape (B, T - n_images + n_images * N, D) = "
                f"{tuple(want_e.shape)}", torch.is_tensor(e) and e.shape == want_e.shape,
                expected=tuple(want_e.shape), got=describe(e), hint=shape_hint)
        side = None
        if torch.is_tensor(m) and m.shape == want_m.shape and not torch.equal(m, want_m):
            side = ("keep the padding on the side where the input has it: right for training, "
                    "left for generation (a left-padded row must end with its last real token)")
        c.check(f"[{name}] the attention mask marks the real positions",
                torch.is_tensor(m) and torch.equal(m.long(), want_m.long()),
                expected=want_m.tolist(), got=m.tolist() if torch.is_tensor(m) else describe(m),
                hint=side)
        if labels is None:
            c.check(f"[{name}] labels stay None when none are given", lab is None, expected="None",
                    got=describe(lab))
        else:
            hint = "every image position gets -100 (there is nothing to predict there); padding too"
            c.check(f"[{name}] labels: -100 at the image positions and padding, the text labels "
                    "moved along", torch.is_tensor(lab) and torch.equal(lab, want_lab),
                    expected=want_lab.tolist(),
                    got=lab.tolist() if torch.is_tensor(lab) else describe(lab), hint=hint)
        c.close(f"[{name}] embeddings equal TinyLlava.merge_inputs's", e, want_e,
                hint="text positions hold embed_tokens(id); image k's N vectors go where the k-th "
                     "-200 stands (counting row by row)")

    # plug it into the model: training loss and greedy generation must not change
    def student(ids, pix=None, mask=None, labels=None):
        return fn(ids, model.encode_images(pix) if pix is not None else None, embed, mask, labels)
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
    c.check("plugged into TinyLlava.generate: the greedy tokens are unchanged",
            torch.equal(got_gen, want_gen), expected=want_gen.tolist(), got=got_gen.tolist())
