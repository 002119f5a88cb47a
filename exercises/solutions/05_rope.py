"""Solution to exercise 5: tinyllava's rope_cos_sin + apply_rope are the reference."""

import tinyllava as tl


def apply_rope(x, positions, theta):
    cos, sin = tl.rope_cos_sin(positions, x.size(-1), theta, x.dtype)  # (B, T, hs) each
    return tl.apply_rope(x, cos, sin)
