"""Exercise 9: ablation, skip stage 1; the image-gap probe. Task: exercises/09_skip_stage1.md
Check: python exercises/check.py 9"""

import torch  # noqa: F401


def image_gap(model, batch):
    """model: a TinyLlava; batch: a dict as data.collate returns (input_ids, labels, attention_mask,
    pixel_values with one image per sample).

    Return (loss_right, loss_shuffled) as two floats: the model's loss on the batch, and its loss
    when every sample gets another sample's image (pixel_values rolled by one along the batch). Do
    not train, and leave the model in the mode (train/eval) you found it in."""
    raise NotImplementedError
