"""Exercise 5: rotary position embeddings."""

import torch

import tinyllava as tl

from .framework import describe, diagnose, exercise, gen, patched
from .toy import tiny_model


def rope_interleaved(x, positions, theta):
    """RoPE on neighbouring pairs (x0, x1), (x2, x3), ...: the RoFormer paper's layout, not the one
    the Hugging Face checkpoints' q/k weights assume (a mistake the checker recognises)."""
    hs = x.size(-1)
    inv = 1.0 / theta ** (torch.arange(0, hs, 2).float() / hs)
    a = positions.float()[..., None] * inv  # (B, T, hs/2)
    cos, sin = a.cos()[:, None], a.sin()[:, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def rope_cos_sin_wrong_freq(positions, hs, theta):
    """cos and sin with frequency i = theta ** (-i / head_dim): the factor 2 forgotten, a known
    mistake."""
    inv = 1.0 / theta ** (torch.arange(0, hs // 2).float() / hs)
    a = torch.cat([positions.float()[..., None] * inv] * 2, dim=-1)
    return a.cos(), a.sin()


def rope_ref(x, positions, theta):
    return tl.apply_rope(x, *tl.rope_cos_sin(positions, x.size(-1), theta, x.dtype))


@exercise(5, "05_rope", "apply_rope", "rotary position embeddings")
def check_rope(fn, c):
    g = gen(5)
    B, nh, T, hs = 2, 3, 6, 8
    x = torch.randn(B, nh, T, hs, generator=g)
    pos = torch.arange(T).expand(B, T)
    got = fn(x, pos, 10000.0)
    c.check("keeps the shape (B, n_heads, T, head_dim) and dtype",
            torch.is_tensor(got) and got.shape == x.shape and got.dtype == x.dtype,
            expected=f"{tuple(x.shape)}, {x.dtype}", got=describe(got))
    c.close("position 0 is left unchanged (a rotation by angle 0)", got[:, :, 0], x[:, :, 0])
    c.close("it is a rotation: the length of every vector is unchanged",
            got.norm(dim=-1), x.norm(dim=-1), 1e-4,
            hint="each pair (x_i, x_j) becomes (x_i cos - x_j sin, x_i sin + x_j cos)")
    pos = torch.randint(0, 50, (B, T), generator=g)
    for theta in (10000.0, 500.0):
        got = fn(x, pos, theta)
        mistakes = [(lambda: rope_interleaved(x, pos, theta),
                     "you paired neighbours (x0, x1), (x2, x3), ...; the Hugging Face layout "
                     "(which the checkpoints' q/k weights assume) pairs x_i with "
                     "x_{i + head_dim/2}"),
                    (lambda: rope_ref(x, -pos, theta),
                     "you rotated the wrong way: the sign of sin is flipped"),
                    (lambda: tl.apply_rope(x, *rope_cos_sin_wrong_freq(pos, hs, theta)),
                     "the frequencies are off: frequency i is theta ** (-2i / head_dim) for "
                     "i = 0 .. head_dim/2 - 1")]
        default = "angle = position * theta ** (-2i / head_dim); pair x_i with x_{i + head_dim/2}"
        c.close(f"equals tinyllava's rope on random vectors at random positions (theta={theta:g})",
                got, rope_ref(x, pos, theta), 1e-5, hint=diagnose(got, mistakes, default))
    q, k = torch.randn(1, 1, 1, hs, generator=g), torch.randn(1, 1, 1, hs, generator=g)
    rotated = lambda v, p: fn(v, torch.tensor([[p]]), 10000.0)  # noqa: E731
    dots = [(rotated(q, m) * rotated(k, n)).sum().item() for m, n in ((5, 2), (12, 9), (40, 37))]
    c.check("q.k depends only on the distance between the positions (5-2, 12-9, 40-37 give the "
            "same score)", max(dots) - min(dots) < 1e-4, expected="three equal scores",
            got=[round(d, 5) for d in dots])
    # plugged into the language model: logits with left padding (positions are not 0..T-1), and
    # cached generation
    model = tiny_model(random_weights=True)
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want_logits = model.language_model(ids, attention_mask=mask)
        want_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6)
        # the model calls rope_cos_sin(positions, head_dim, theta, dtype) then
        # apply_rope(q, cos, sin): hand the positions and theta through, and let your function do
        # the rest
        originals = tl.rope_cos_sin, tl.apply_rope

        def plugged(x, positions, theta):  # your function runs with tinyllava's originals in place
            with patched(tl, "rope_cos_sin", originals[0]), patched(tl, "apply_rope", originals[1]):
                return fn(x, positions, theta)

        def pass_through(positions, hs, theta, dtype):
            return positions, theta
        with patched(tl, "rope_cos_sin", pass_through), patched(tl, "apply_rope", plugged):
            got_logits = model.language_model(ids, attention_mask=mask)
            got_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    c.close("plugged into the language model: logits of a left-padded batch are unchanged",
            got_logits, want_logits, 1e-4)
    c.check("plugged into generation with a KV cache: the greedy tokens are unchanged",
            torch.equal(got_gen, want_gen), expected=want_gen.tolist(), got=got_gen.tolist())
