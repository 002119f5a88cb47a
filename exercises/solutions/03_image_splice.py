"""Solution to exercise 3: the project's own splice (tinyllava.splice_images, which
TinyLlava.merge_inputs calls)."""

import torch

import tinyllava as tl


def merge_inputs(input_ids, image_features, embed_tokens, attention_mask=None, labels=None):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    is_image = input_ids == tl.IMAGE_TOKEN_INDEX
    # -200 is no row of the embedding table: embed a placeholder id, the splice replaces it
    embeds = embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D)
    if not is_image.any():
        return embeds, attention_mask, labels
    image_features = image_features.to(embeds.dtype)
    return tl.splice_images(input_ids, embeds, image_features, attention_mask, labels)
