"""Solution to exercise 9: how much does the model look at the image?"""

import torch


@torch.no_grad()
def image_gap(model, batch):
    was_training = model.training
    model.eval()
    args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    _, real = model(pixel_values=batch["pixel_values"], **args)
    # image i now goes to the sample of image i + 1: same pixels statistics, wrong content
    _, shuffled = model(pixel_values=batch["pixel_values"].roll(1, dims=0), **args)
    model.train(was_training)
    return real.item(), shuffled.item()
