"""Exercise 10: stage 2 with LoRA on the LLM. Task: exercises/10_lora.md
Check: python exercises/check.py 10"""

import math  # noqa: F401

import torch  # noqa: F401
import torch.nn as nn  # noqa: F401


def add_lora(language_model, rank=8, alpha=16, targets=("q_proj", "v_proj")):
    """language_model: a tinyllava LanguageModel. Freeze all its weights, then replace the Linear
    `layer.self_attn.<name>` of every layer, for each name in targets, by a module that computes
    base(x) + (alpha / rank) * x @ A^T @ B^T and has the attributes
        .base (the original nn.Linear), .lora_A (rank, in_features),
        .lora_B (out_features, rank), .scale.
    Return the list of the new trainable parameters (every lora_A and lora_B)."""
    raise NotImplementedError
