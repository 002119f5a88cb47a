"""Solution to exercise 3, written out (TinyLlava.merge_inputs in tinyllava.py does the same on a model)."""

import torch

from tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def merge_inputs(input_ids, image_features, embed_tokens, attention_mask=None, labels=None):
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    is_image = input_ids == IMAGE_TOKEN_INDEX
    embeds = embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D); -200 is no row of the table
    if not is_image.any():
        return embeds, attention_mask, labels
    N = image_features.size(1)
    left_padded = bool((attention_mask[:, 0] == 0).any())
    seqs, labs, k = [], [], 0
    for b in range(B):
        keep = attention_mask[b].bool()  # drop the padding, splice, pad again below
        ids, e = input_ids[b][keep], embeds[b][keep]
        lab = labels[b][keep] if labels is not None else None
        parts_e, parts_l, start = [], [], 0
        for c in torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist() + [len(ids)]:
            parts_e.append(e[start:c])
            if lab is not None:
                parts_l.append(lab[start:c])
            if c < len(ids):  # a placeholder: the next image's N vectors, none of them a target
                parts_e.append(image_features[k].to(e.dtype))
                parts_l.append(torch.full((N,), IGNORE_INDEX, dtype=torch.long, device=ids.device))
                k += 1
            start = c + 1
        seqs.append(torch.cat(parts_e))
        labs.append(torch.cat(parts_l) if lab is not None else None)
    T2 = max(len(s) for s in seqs)
    out = embeds.new_zeros(B, T2, embeds.size(-1))
    out_mask = attention_mask.new_zeros(B, T2)
    out_labels = torch.full((B, T2), IGNORE_INDEX, dtype=torch.long, device=input_ids.device) if labels is not None else None
    for b, s in enumerate(seqs):
        sl = slice(T2 - len(s), T2) if left_padded else slice(0, len(s))  # keep the input's padding side
        out[b, sl], out_mask[b, sl] = s, 1
        if labels is not None:
            out_labels[b, sl] = labs[b]
    return out, out_mask, out_labels
