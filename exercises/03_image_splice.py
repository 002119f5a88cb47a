"""Exercise 3: splicing image features at the -200 placeholder. Task: exercises/03_image_splice.md
Check: python exercises/check.py 3"""

import torch  # noqa: F401

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


def merge_inputs(input_ids, image_features, embed_tokens, attention_mask=None, labels=None):
    """input_ids (B, T) with one -200 per image; image_features (n_images, N, D), already
    projected, in placeholder order (row by row), or None when there is no -200; embed_tokens: the
    LLM's nn.Embedding; attention_mask (B, T) 1 = real token, 0 = padding (None = no padding);
    labels (B, T) or None.

    Return (embeds (B, T', D), attention_mask (B, T'), labels (B, T') or None), where every -200
    has been replaced by its image's N vectors (labelled -100), and padding stays on the side it
    was on."""
    raise NotImplementedError
