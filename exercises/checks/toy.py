"""Tiny models and data, built directly with tinyllava (no download, no transformers): what the
checks plug the students' functions into."""

import contextlib
import io

import torch

import tinyllava as tl

IGNORE, IMAGE = tl.IGNORE_INDEX, tl.IMAGE_TOKEN_INDEX

VISION = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def tiny_model(seed=0, random_weights=False, **text):
    """A TinyLlava with a 16x16-pixel CLIP-style tower (4x4 patches -> 16 image tokens) and a
    2-layer GQA decoder."""
    torch.manual_seed(seed)
    vision = tl.VisionTower(tl.VisionConfig(**VISION))
    lm = tl.LanguageModel(tl.LMConfig(**{**TEXT, **text}))
    with contextlib.redirect_stdout(io.StringIO()):  # TinyLlava prints its parameter table
        model = tl.TinyLlava(vision, lm, "mlp2x_gelu")
    # larger weights than the training init, so that every term matters in a comparison
    if random_weights:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                offset = 1.0 if "norm" in name and p.dim() == 1 else 0.0  # norm gains around 1
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + offset)
    return model.eval()


def toy_batch(n=8, seed=0):
    """A batch in data.collate's format where the answer depends on the image: 4 classes of images,
    "<s> <image> what is it ? -> 10 + class </s>"; only the answer and the end token are trained."""
    patterns = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1234))
    cls = torch.arange(n) % 4
    noise = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    input_ids = torch.tensor([[1, IMAGE, 5, 6, 10 + int(c), 2] for c in cls])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, IGNORE, 10 + int(c), 2] for c in cls])
    return dict(input_ids=input_ids, labels=labels, attention_mask=torch.ones_like(input_ids),
                pixel_values=patterns[cls] + 0.1 * noise)


def merge(model, batch):
    """TinyLlava.merge_inputs on a batch: (embeds, attention_mask, labels), images spliced in."""
    return model.merge_inputs(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                              batch["labels"])


def train(model, batch, steps, lr, loss_fn=tl.shifted_cross_entropy, params=None):
    """Plain AdamW steps on one batch (the model over-fits it); returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        embeds, mask, labels = merge(model, batch)
        loss = loss_fn(model.language_model(inputs_embeds=embeds, attention_mask=mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
