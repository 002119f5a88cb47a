"""Exercise 10: stage 2 with LoRA on the LLM."""

import torch
import torch.nn as nn

import tinyllava as tl

from .framework import describe, exercise
from .toy import TEXT, tiny_model, toy_batch, train


@torch.no_grad()
def merge_lora(lm):
    """W' = W + scale * B @ A in every LoRA'd attention projection, then the plain Linear goes back
    in its place: the model is an ordinary checkpoint again (study.py merges before saving)."""
    for layer in lm.model.layers:
        for name, mod in list(layer.self_attn.named_children()):
            if hasattr(mod, "lora_A"):
                mod.base.weight += mod.scale * mod.lora_B @ mod.lora_A
                setattr(layer.self_attn, name, mod.base)


def lora_parameter_count(rank):
    """rank * (in + out) for q_proj and v_proj of each layer of the tiny model's LLM."""
    D, hd = TEXT["hidden_size"], TEXT["head_dim"]
    Dq, Dkv = TEXT["num_attention_heads"] * hd, TEXT["num_key_value_heads"] * hd
    return TEXT["num_hidden_layers"] * (rank * (D + Dq) + rank * (D + Dkv))


@exercise(10, "10_lora", "add_lora", "stage 2 with LoRA on the LLM")
def check_lora(fn, c):
    # large random weights stand in for a pretrained LLM
    model, batch = tiny_model(random_weights=True), toy_batch()
    lm = model.language_model

    def logits():
        return model(**{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")})[0]
    base_weights = {n: p.detach().clone() for n, p in lm.named_parameters()}
    with torch.no_grad():
        before = logits()
    params = fn(lm, rank=4, alpha=8)
    ok = isinstance(params, (list, tuple)) and all(isinstance(p, nn.Parameter) for p in params)
    c.check("returns the list of LoRA parameters", ok, expected="a list of nn.Parameter",
            got=describe(params))
    L, n_want = TEXT["num_hidden_layers"], lora_parameter_count(4)
    n_got = sum(p.numel() for p in params)
    c.check(f"rank 4 on q_proj and v_proj of {L} layers: {n_want:,} LoRA parameters",
            n_got == n_want, expected=n_want, got=n_got,
            hint="per wrapped Linear: A is (rank, in_features), B is (out_features, rank)")
    attn = lm.model.layers[0].self_attn
    for name in ("q_proj", "v_proj"):
        mod = getattr(attn, name)
        ok = all(hasattr(mod, a) for a in ("base", "lora_A", "lora_B", "scale"))
        c.check(f"layers.0.self_attn.{name} is wrapped, with .base, .lora_A, .lora_B, .scale", ok,
                expected="a module with attributes base, lora_A, lora_B, scale",
                got=type(mod).__name__)
    c.check("scale = alpha / rank",
            all(abs(getattr(attn, n).scale - 2.0) < 1e-9 for n in ("q_proj", "v_proj")),
            expected=2.0, got=attn.q_proj.scale)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    lora_names = {n for n, p in lm.named_parameters() if any(p is q for q in params)}
    c.check("in the LLM only the LoRA matrices are trainable", trainable == lora_names,
            expected=f"{len(lora_names)} trainable tensors (the LoRA ones)",
            got=f"{len(trainable)}, e.g. {sorted(trainable - lora_names)[:3]}",
            hint="freeze every pretrained weight of the LLM (requires_grad_(False)) before adding "
                 "the LoRA matrices")
    with torch.no_grad():
        after = logits()
    c.close("right after add_lora the model computes exactly what it computed before (B starts at "
            "zero)", after, before, 1e-6,
            hint="initialise lora_B with zeros (and lora_A randomly), so the update B @ A starts "
                 "at 0")
    model.vision_tower.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    print("        stage 2 with LoRA (tinyllava.parameter_table):")
    c.show(tl.parameter_table(model))
    losses = train(model, batch, steps=30, lr=1e-2)
    trend = f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    c.check(f"stage 2 (projector + LoRA) learns: loss {trend} in 30 steps",
            losses[-1] < 0.5 * losses[0], expected="the final loss below half the first", got=trend)
    # the pretrained weights under their original names (a wrapped Linear keeps its weight in .base)
    names = {n.replace(".base.", ".") if ".base." in n else n: p
             for n, p in lm.named_parameters() if "lora_" not in n}
    changed = [n for n, w in base_weights.items() if n not in names or not torch.equal(names[n], w)]
    c.check("the pretrained LLM weights are bit-identical after training", not changed,
            expected="no change", got=f"{len(changed)} changed, e.g. {changed[:2]}",
            hint="keep the original Linear as .base and never hand its weight to the optimizer")
    lora_Bs = (getattr(layer.self_attn, n).lora_B
               for layer in lm.model.layers for n in ("q_proj", "v_proj"))
    c.check("the LoRA matrices did change", any(b.abs().sum() > 0 for b in lora_Bs),
            expected="lora_B != 0 after training", got="all lora_B still zero")
    with torch.no_grad():
        want = logits()
        merge_lora(lm)
        merged = logits()
    c.close("merging W + scale * B @ A into the base weights gives the same logits (LoRA costs "
            "nothing at inference)", merged, want, 1e-5 * want.abs().max().item(),
            hint="forward must compute base(x) + scale * (x @ A^T @ B^T)")
