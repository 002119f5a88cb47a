"""Exercise 1: the shifted cross-entropy with -100."""

import torch
import torch.nn.functional as F

import tinyllava as tl

from .framework import describe, diagnose, exercise, gen, max_diff
from .toy import IGNORE, merge, tiny_model, toy_batch, train


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
            expected="a 0-dim tensor", got=describe(got),
            hint="reduce to one number: the mean over the trained tokens")
    x, flat = logits.detach(), lambda t: t.reshape(-1, V)

    def summed(logits, targets):  # the loss summed over the trained targets, for wrong denominators
        return F.cross_entropy(flat(logits), targets.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
    mistakes = [
        (lambda: F.cross_entropy(flat(x), labels.reshape(-1)),
         "this is the loss WITHOUT the shift: logits[:, t] is the model's guess for the NEXT "
         "token, so score logits[:, :-1] against labels[:, 1:]"),
        (lambda: F.cross_entropy(flat(x[:, 1:]), labels[:, :-1].reshape(-1)),
         "you shifted the wrong way round: keep logits[:, :-1] (predictions for positions 1..T-1) "
         "and labels[:, 1:]"),
        (lambda: summed(x[:, :-1], labels[:, 1:]) / labels[:, 1:].numel(),
         "you divided by every position; divide by the number of TRAINED positions "
         "(labels != -100)"),
        (lambda: summed(x[:, :-1], labels[:, 1:]) / (labels != IGNORE).sum(),
         "you counted the trained tokens before shifting; count them in labels[:, 1:], "
         "the targets actually scored"),
        (lambda: torch.stack([F.cross_entropy(x[b, :-1], labels[b, 1:], ignore_index=IGNORE)
                              for b in range(B)]).mean(),
         "you averaged per sample and then over the batch; tinyllava (like LLaVA) averages over "
         "all trained tokens of the batch"),
    ]
    default = ("check the shift (logits[:, :-1] vs labels[:, 1:]) and that -100 positions are "
               "left out")
    c.close("equals tinyllava.shifted_cross_entropy on random logits with a masked prompt and "
            "padding", got, want, hint=diagnose(got, mistakes, default))
    c.check("the loss keeps its graph (gradients can flow back to the logits)", got.requires_grad,
            expected="a tensor with requires_grad=True", got="a tensor without a graph",
            hint="do not call .item(), .detach() or torch.no_grad() inside the loss")
    (grad_want,) = torch.autograd.grad(want, logits)
    (grad_got,) = torch.autograd.grad(got, logits)
    c.close("its gradient with respect to the logits equals the reference's", grad_got, grad_want)
    empty = loss_fn(logits.detach(), torch.full_like(labels, IGNORE))
    ok = torch.is_tensor(empty) and bool(torch.isfinite(empty)) and float(empty) == 0.0
    c.check("a batch without any trained token gives 0, not NaN", ok, expected="0.0",
            got=describe(empty),
            hint="0 trained tokens means 0 / 0: divide by the count clamped to at least 1")
    half = loss_fn(logits.detach().bfloat16(), labels)
    half_want = tl.shifted_cross_entropy(logits.detach().bfloat16(), labels)
    c.check("accepts bf16 logits (as under autocast) and stays accurate",
            max_diff(half.float(), half_want) <= 1e-3,
            expected=f"{float(half_want):.4f}", got=describe(half),
            hint="compute the cross-entropy in fp32: logits.float()")
    model, batch = tiny_model(), toy_batch()
    embeds, mask, spliced = merge(model, batch)
    with torch.no_grad():
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask)
        got = loss_fn(logits, spliced)
        keys = ("input_ids", "pixel_values", "attention_mask", "labels")
        c.close("on a real TinyLlava batch (16 image tokens spliced in) it equals the model's own "
                "loss", got, model(**{k: batch[k] for k in keys})[1])
    losses = train(model, batch, steps=25, lr=1e-2, loss_fn=loss_fn)
    trend = f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    c.check(f"training a tiny TinyLlava with your loss for 25 steps lowers it: {trend}",
            losses[-1] < 0.5 * losses[0], expected="the final loss below half the first", got=trend)
