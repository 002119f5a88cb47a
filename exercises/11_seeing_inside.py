"""Exercise 11: seeing inside, the image tokens as words. Task: exercises/11_seeing_inside.md
Check: python exercises/check.py 11"""

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401


def nearest(tokens, vocab, k):
    """tokens (..., D): vectors in the LLM's input-embedding space (e.g. the projector's image
    tokens); vocab (V, D): the LLM's input embedding table, one row per token id.

    Return (cosines, ids), each of shape (..., k): for each vector, the k rows of vocab with the
    highest cosine similarity to it, highest first, and those similarities."""
    raise NotImplementedError
