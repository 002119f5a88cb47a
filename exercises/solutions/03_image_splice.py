"""Solution to exercise 3: the project's own splice (tinyllava.splice_images, which TinyLlava.merge_inputs calls)."""

import torch

import tinyllava as tl


def merge_inputs(input_ids, image_features, embed_tokens, attention_mask=None, labels=None):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    is_image = input_ids == tl.IMAGE_TOKEN_INDEX
    embeds = embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D); -200 is no row of the table
    if not is_image.any():
        return embeds, attention_mask, labels
    return tl.splice_images(input_ids, embeds, image_features.to(embeds.dtype), attention_mask, labels)
