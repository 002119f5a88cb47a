"""Exercise 9: ablation, skip stage 1; the image-gap probe (does the model look at the image?)."""

import torch

from .framework import describe, exercise
from .toy import tiny_model, toy_batch, train


@exercise(9, "09_skip_stage1", "image_gap", "ablation: skip stage 1 (the image-gap probe)")
def check_image_gap(fn, c):
    model, batch = tiny_model(), toy_batch()
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def ref():
        with torch.no_grad():
            real = model(pixel_values=batch["pixel_values"], **args)[1].item()
            shuffled = model(pixel_values=batch["pixel_values"].roll(1, 0), **args)[1].item()
            return real, shuffled
    out = fn(model, batch)
    c.check("returns two floats (loss with the right images, loss with shuffled images)",
            isinstance(out, tuple) and len(out) == 2 and all(isinstance(v, float) for v in out),
            expected="(float, float)", got=describe(out),
            hint="return plain Python floats: loss.item()")
    want = ref()
    c.check("matches the reference on an untrained model",
            max(abs(a - b) for a, b in zip(out, want)) < 1e-5,
            expected=tuple(round(v, 5) for v in want), got=tuple(round(v, 5) for v in out),
            hint="loss of TinyLlava(batch); then the same with pixel_values.roll(1, dims=0)")
    with torch.no_grad():
        for p in model.multi_modal_projector.parameters():
            p.zero_()
    real, shuffled = fn(model, batch)
    c.check("a model whose projector outputs zeros cannot see the image: gap = 0",
            abs(real - shuffled) < 1e-6, expected="equal losses",
            got=f"{real:.5f} vs {shuffled:.5f}")
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    fn(model, batch)
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    c.check("leaves the model as it found it (weights and train/eval mode)",
            model.training and unchanged, expected="weights unchanged, model.training still True",
            got=f"model.training={model.training}",
            hint="evaluate under torch.no_grad() in eval mode, then restore the mode")
    model.vision_tower.requires_grad_(False)
    train(model, batch, steps=40, lr=1e-2)
    real, shuffled = fn(model, batch)
    c.check(f"after training on an image-dependent task the probe sees the image: {real:.3f} "
            f"(right) vs {shuffled:.3f} (shuffled)", shuffled > real + 0.5,
            expected="shuffled loss clearly above the right-image loss",
            got=f"{real:.3f} vs {shuffled:.3f}")
