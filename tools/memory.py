"""
"Which GPU do I need?": the memory of one stage-2 training step, from a formula whose activation term is
measured, checked against the memory a real step takes.

    python -m tools.memory            # the table: LLM shapes x full / LoRA x gradient checkpointing
    python -m tools.memory --check    # the formula against a real fp32 step's peak RSS on this CPU

A step of train_sft.py holds (P: all parameters, P_t: the trained ones; weights fp32, bf16 autocast):
  weights      4 P           fp32 weights of the vision tower, projector and LLM
  gradients    4 P_t
  AdamW        8 P_t         two fp32 moments per trained parameter
  activations  L * tokens * a + the trained positions' logits (fp32, with their gradient)
where a is what one decoder layer keeps for its backward pass per token (per layer input only, with
gradient checkpointing, plus one layer's worth while it is recomputed). a is not guessed: it is
counted, in bytes, by running one decoder layer of the model's shape under bf16 autocast with
torch.autograd.graph.saved_tensors_hooks. Not counted: the frozen vision tower's forward (no graph, and
gone before the LLM's), the CUDA context and allocator slack (add 10-20% on a GPU), the data.

--check runs a real stage-2 step at a small shape in fp32 on the CPU (weights, gradients, AdamW,
activations counted the same way in fp32) and prints the formula beside the growth of the process's peak
resident memory during the step.
"""

import argparse
from dataclasses import replace

import torch

from tinyllava import (
    LanguageModel,
    LlamaDecoderLayer,
    LMConfig,
    Projector,
    TinyLlava,
    VisionConfig,
    VisionTower,
    add_lora,
    command_line,
    rope_cos_sin,
)

GIB = 2**30
# the LLM shapes of the table (config.json values of the public checkpoints)
SMOL = dict(vocab_size=49152, head_dim=64, tie_word_embeddings=True)
QWEN = dict(model_type="qwen2", vocab_size=151936, attention_bias=True, tie_word_embeddings=True)
LLMS = {
    "SmolLM2-135M": LMConfig(**SMOL, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3),
    "SmolLM2-360M": LMConfig(**SMOL, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                             num_attention_heads=15, num_key_value_heads=5),
    "SmolLM2-1.7B": LMConfig(**SMOL, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                             num_attention_heads=32, num_key_value_heads=32),
    "Qwen2.5-0.5B": LMConfig(**QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, head_dim=64),
    "Qwen2.5-1.5B": LMConfig(**QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, head_dim=128),
}
# SigLIP-B/16-224: 196 image tokens of width 768
SIGLIP_B = VisionConfig(model_type="siglip_vision_model", image_size=224, patch_size=16, hidden_size=768,
                        intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def count(module):
    return sum(p.numel() for p in module.parameters())


def lm_params(cfg):
    """Parameters of a LanguageModel of this shape, without building it."""
    D, H, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = D * q + 2 * D * kv + q * D + (q + 2 * kv if cfg.attention_bias else 0)
    per_layer = attention + 3 * D * H + 2 * D
    return L * per_layer + V * D * (1 if cfg.tie_word_embeddings else 2) + D


def lora_params(cfg, r):
    """Adapters on all seven projections of every layer: r * (in + out) each."""
    D, H = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = [(D, q), (D, kv), (D, kv), (q, D), (D, H), (D, H), (H, D)]
    return cfg.num_hidden_layers * r * sum(a + b for a, b in shapes)


def saved_by_layer(cfg, dtype, lora_r=0, tokens=256):
    """Bytes one decoder layer of this shape keeps for its backward pass on `tokens` tokens, its input
    requiring grad as inside the model, every weight (or only LoRA adapters) trained: the storages of
    the tensors autograd saves, each once; the parameters themselves are not counted (they are the
    weights), their bf16 copies under autocast are."""
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(replace(cfg, num_hidden_layers=1), 0)
    if lora_r:
        holder = torch.nn.Module()  # add_lora walks language_model.model.layers
        holder.model = torch.nn.Module()
        holder.model.layers = torch.nn.ModuleList([layer])
        add_lora(holder, r=lora_r, alpha=2 * lora_r)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    x = torch.randn(1, tokens, cfg.hidden_size, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(tokens)[None], cfg.head_dim, cfg.rope_theta, torch.float32)
    seen = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen.add((ptr, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            layer(x, cos, sin, "causal", None)
    return sum(n for _, n in seen)


def layer_activations(cfg, dtype, lora_r=0):
    """(bytes per token, bytes per layer whatever the tokens: autocast's weight copies) that a decoder
    layer keeps for backward, from two token counts."""
    small, large = (saved_by_layer(cfg, dtype, lora_r, t) for t in (128, 256))
    per_token = (large - small) / 128
    return per_token, small - 128 * per_token


def step_memory(cfg, vision, batch, positions, lora_r=0, checkpointing=False, dtype=torch.bfloat16,
                trained_share=0.25):
    """{part: bytes} of one stage-2 step (see the module docstring); trained_share: the share of the
    positions whose next token is trained (answers), where lm_head runs."""
    P_vision = count(VisionTower(vision))
    P_projector = count(Projector("mlp2x_gelu", vision.hidden_size, cfg.hidden_size))
    P_llm = lm_params(cfg)
    P_trained = P_projector + (lora_params(cfg, lora_r) if lora_r else P_llm)
    tokens = batch * positions
    per_token, per_layer = layer_activations(cfg, dtype, lora_r)
    L = cfg.num_hidden_layers
    if checkpointing:  # each layer's fp32 input (the residual stream), and one layer recomputed at a time
        layers = L * tokens * cfg.hidden_size * 4 + tokens * per_token + L * per_layer
    else:
        layers = L * (tokens * per_token + per_layer)
    logits = 2 * 4 * trained_share * tokens * cfg.vocab_size  # the trained positions' fp32 logits, grads
    return dict(weights=4 * (P_vision + P_projector + P_llm), gradients=4 * P_trained, adamw=8 * P_trained,
                activations=layers + logits, trained=P_trained)


def table(batch=8, positions=1024, lora_r=128):
    print(f"stage-2 step, SigLIP-B/16-224 + LLM, bf16 autocast over fp32 weights, AdamW, batch {batch} x "
          f"{positions} positions (formula; GiB, without CUDA context and allocator slack):")
    print(f"{'LLM':<14} {'params':>8}  {'full':>7} {'full+ckpt':>10} {'LoRA ' + str(lora_r):>9} "
          f"{'LoRA+ckpt':>10}")
    for name, cfg in LLMS.items():
        totals = []
        for r in (0, lora_r):
            for ckpt in (False, True):
                m = step_memory(cfg, SIGLIP_B, batch, positions, lora_r=r, checkpointing=ckpt)
                totals.append(sum(v for k, v in m.items() if k != "trained") / GIB)
        print(f"{name:<14} {lm_params(cfg) / 1e6:7.0f}M  " + " ".join(f"{t:>9.1f}" for t in totals))


def status(field):
    """VmRSS (resident now) or VmHWM (its peak) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak():
    """Start VmHWM afresh from the memory resident now (Linux), so that a peak reached while building
    the model is not taken for the step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def check(batch=2, positions=512):
    """A real fp32 stage-2 step of a small model on the CPU against the formula."""
    cfg = replace(LLMS["SmolLM2-135M"], num_hidden_layers=6)
    vision = replace(SIGLIP_B, num_hidden_layers=2)
    torch.manual_seed(0)
    model = TinyLlava(VisionTower(vision), LanguageModel(cfg), "mlp2x_gelu")
    model.vision_tower.requires_grad_(False)
    n_text = positions - model.vision_tower.num_tokens + 1
    ids = torch.randint(0, cfg.vocab_size, (batch, n_text))
    ids[:, 0] = -200
    labels = ids.clone()
    labels[:, : int(0.75 * n_text)] = -100  # the last quarter trained
    labels[:, 0] = -100
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    reset_peak()
    before = status("VmRSS")
    _, loss = model(ids, pixel_values=pixels, labels=labels, return_logits=False)
    loss.backward()
    optimizer.step()
    grown = status("VmHWM") - before
    m = step_memory(cfg, vision, batch, positions, dtype=torch.float32)
    formula = m["gradients"] + m["adamw"] + m["activations"]
    parts = " + ".join(f"{k} {m[k] / GIB:.2f}" for k in ("gradients", "adamw", "activations"))
    print(f"fp32 stage-2 step, {cfg.num_hidden_layers}-layer SmolLM2-135M-shaped LLM + 2-layer SigLIP-B, "
          f"batch {batch} x {positions}: {parts} = {formula / GIB:.2f} GiB by the formula; the process's "
          f"peak resident memory grew by {grown / GIB:.2f} GiB during the step ({grown / formula:.0%})")
    return formula, grown


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="the formula against a real step's memory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--positions", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.check:
        check()
    else:
        table(args.batch, args.positions)


if __name__ == "__main__":
    command_line(main)
