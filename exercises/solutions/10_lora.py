"""Solution to exercise 10: LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on the LLM's
attention."""

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(x)): a frozen Linear plus a trainable rank-r update, B starting
    at 0."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        # A initialised like nn.Linear's weight; B = 0 keeps the model unchanged at the start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_A.T @ self.lora_B.T)


def add_lora(language_model, rank=8, alpha=16, targets=("q_proj", "v_proj")):
    language_model.requires_grad_(False)  # the pretrained weights stay as they are
    params = []
    for layer in language_model.model.layers:
        for name in targets:
            lora = LoRALinear(getattr(layer.self_attn, name), rank, alpha)
            setattr(layer.self_attn, name, lora)
            params += [lora.lora_A, lora.lora_B]
    return params
