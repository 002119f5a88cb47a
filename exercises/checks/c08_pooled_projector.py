"""Exercise 8: a token-reducing projector (2x2 average pooling)."""

import torch
import torch.nn.functional as F

import tinyllava as tl

from .framework import describe, diagnose, exercise, gen
from .toy import TEXT, VISION, merge, tiny_model, toy_batch, train


class PooledProjector(tl.Projector):
    """mlp2x_gelu applied after a token-reducing function (n, N, Dv) -> (n, N', Dv); study.py uses
    it too."""

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


def pool_grid(x, side, pool=F.avg_pool2d):
    """The reference: the (n, side * side, D) tokens as the (n, D, side, side) grid they are,
    pooled 2x2, and back to (n, side * side / 4, D) tokens in row-major order."""
    grid = x.transpose(1, 2).reshape(x.size(0), x.size(2), side, side)
    return pool(grid, 2).flatten(2).transpose(1, 2)


@exercise(8, "08_pooled_projector", "pool2x2", "a token-reducing projector: 2x2 average pooling")
def check_pool(fn, c):
    g = gen(8)
    x = torch.randn(3, 16, 5, generator=g)  # 3 images, a 4x4 grid of patches, 5 channels
    got = fn(x)
    c.check("(n, 16, D) -> (n, 4, D): four times fewer tokens",
            torch.is_tensor(got) and got.shape == (3, 4, 5), expected="shape (3, 4, 5)",
            got=describe(got))
    want = pool_grid(x, 4)
    mistakes = [(lambda: x.reshape(3, 4, 4, 5).mean(2),
                 "you averaged 4 CONSECUTIVE tokens, i.e. 1x4 strips of a row; the tokens are a "
                 "4x4 grid in row-major order (token r * side + c is row r, column c): pool 2x2 "
                 "squares of that grid"),
                (lambda: want.reshape(3, 2, 2, 5).transpose(1, 2).reshape(3, 4, 5),
                 "keep the pooled tokens in row-major order, like the patches"),
                (lambda: pool_grid(x, 4, F.max_pool2d),
                 "average, don't take the max")]
    default = "reshape (n, N, D) -> (n, D, side, side), pool 2x2, and back"
    c.close("each output token is the mean of a 2x2 square of the patch grid, in row-major order",
            got, want, hint=diagnose(got, mistakes, default))
    x = torch.randn(2, 64, 3, generator=g)
    c.close("an 8x8 grid becomes 4x4", fn(x), pool_grid(x, 8))
    for N, why in ((15, "not a square"), (9, "a 3x3 grid, odd side")):
        try:
            fn(torch.randn(1, N, 4))
            raised = None
        except Exception as e:
            raised = e
        c.check(f"{N} tokens ({why}) raises ValueError", isinstance(raised, ValueError),
                expected="ValueError", got=describe(raised) if raised else "no error",
                hint="check that N is a perfect square with an even side and raise ValueError "
                     "otherwise")
    model, batch = pooled_model(fn), toy_batch()
    with torch.no_grad():
        embeds, _, _ = merge(model, batch)
    T = batch["input_ids"].size(1)
    c.check(f"plugged into TinyLlava: each image takes 4 positions instead of 16 (sequence "
            f"{T - 1 + 16} -> {T - 1 + 4})",
            embeds.size(1) == T - 1 + 4, expected=T - 1 + 4, got=embeds.size(1))
    losses = train(model, batch, steps=30, lr=1e-2)
    trend = f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    c.check(f"a tiny TinyLlava with the pooled projector learns: loss {trend} in 30 steps",
            losses[-1] < 0.5 * losses[0], expected="the final loss below half the first", got=trend)
