"""Exercise 5: rotary position embeddings. Task: exercises/05_rope.md
Check: python exercises/check.py 5"""

import torch  # noqa: F401


def apply_rope(x, positions, theta):
    """x (B, n_heads, T, head_dim) queries or keys; positions (B, T) integer positions; theta the
    base of the frequencies (config.rope_theta, e.g. 10000.0).

    Return x rotated by the angles of its positions (same shape and dtype), in the Hugging Face
    layout: dimension i is paired with dimension i + head_dim/2."""
    raise NotImplementedError
