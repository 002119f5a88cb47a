"""Exercise 1: the shifted cross-entropy with -100. Task: exercises/01_shifted_loss.md
Check: python exercises/check.py 1"""

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401

IGNORE_INDEX = -100  # label of a position that is context, not a target


def shifted_cross_entropy(logits, labels):
    """logits (B, T, V) from the model, labels (B, T) aligned with the input ids (labels[:, t] is
    the token at position t, or -100 where nothing is trained).

    Return the mean next-token cross-entropy over the trained targets, as a 0-dim tensor that
    gradients can flow through; 0 (not NaN) when no position is trained."""
    raise NotImplementedError
