"""Exercise 8: a token-reducing projector (2x2 average pooling).
Task: exercises/08_pooled_projector.md
Check: python exercises/check.py 8"""

import math  # noqa: F401

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401


def pool2x2(features):
    """features (n_images, N, D): the vision tower's patch features, the sqrt(N) x sqrt(N) grid of
    patches in row-major order. Return (n_images, N / 4, D): the mean of every 2x2 square of the
    grid, in row-major order. Raise ValueError if N is not a square with an even side."""
    raise NotImplementedError
