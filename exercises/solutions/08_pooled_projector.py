"""Solution to exercise 8: 2x2 average pooling of the patch grid."""

import math

import torch.nn.functional as F


def pool2x2(features):
    n, N, D = features.shape
    side = math.isqrt(N)
    if side * side != N or side % 2:
        raise ValueError(f"{N} tokens is not an even square grid of patches")
    # the tokens are the grid in row-major order
    grid = features.transpose(1, 2).reshape(n, D, side, side)  # (n, D, side, side)
    return F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (n, N/4, D), still row-major
