"""tinyllava: LLaVA (Visual Instruction Tuning) from scratch, in one file.

    image ─► ViT (CLIP / SigLIP) ─► penultimate hidden state, CLS dropped   (n_img, N, Dv)
          ─► projector (mlp2x_gelu)                                      (n_img, N, D)
          ─► spliced into the token embeddings at the -200 placeholder    (B, T', D)
          ─► Llama-style decoder ─► logits ─► shifted cross-entropy on the answer tokens

Top to bottom: building blocks, vision tower, projector, language model, LLaVA glue and generation,
configs, loading. Module names copy the Hugging Face checkpoint keys: loading is near the identity.

References: Liu et al. 2023, "Visual Instruction Tuning" (LLaVA), https://arxiv.org/abs/2304.08485
  Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5: mlp2x_gelu, pad)
  Radford et al. 2021 (CLIP); Zhai et al. 2023 (SigLIP); Touvron et al. 2023 (Llama); Su 2021 (RoPE)
"""

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

IMAGE_TOKEN_INDEX = -200  # the placeholder id that marks where an image's features are spliced in
IGNORE_INDEX = -100  # label value that cross-entropy ignores: the token is context, not a target


class InputError(ValueError):
    """A user's mistake (bad file, flag or checkpoint): printed as one line, with no traceback."""

# -----------------------------------------------------------------------------
# Building blocks

def quick_gelu(x):
    # CLIP was trained with this sigmoid approximation of GELU; exact GELU would change its features
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu": F.gelu, "silu": F.silu}  # CLIP, SigLIP, LLaVA's projector, Llama's SwiGLU


def get_activation(name):
    if name not in ACTIVATIONS:
        raise InputError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """Llama's norm: rescale by the root mean square (no mean subtracted, no bias), in fp32."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype, x = x.dtype, x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """Rotary angles for integer positions (B, T) -> cos, sin of shape (B, T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, hs): HF pairs dim i with dim i + hs/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    # rotate each (x_i, x_{i+hs/2}) pair by its angle: q.k then depends only on relative position
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]  # cos/sin broadcast over heads: (B, 1, T, hs)


# -----------------------------------------------------------------------------
# Vision tower: a ViT that covers CLIP and SigLIP

@dataclass
class VisionConfig:
    model_type: str = "clip_vision_model"  # or "siglip_vision_model" (no CLS, no pre-LN)
    image_size: int = 224  # input side in pixels; learned positions exist for exactly this size
    patch_size: int = 16  # side of one square patch: (image_size // patch_size) ** 2 patches
    num_channels: int = 3  # RGB
    hidden_size: int = 768  # width Dv of the ViT
    intermediate_size: int = 3072  # hidden width of each MLP
    num_hidden_layers: int = 12  # layers in the checkpoint; we build only those the feature needs
    num_attention_heads: int = 12  # heads; head size is hidden_size // num_attention_heads
    hidden_act: str = "quick_gelu"  # CLIP: quick_gelu; SigLIP: gelu_pytorch_tanh
    layer_norm_eps: float = 1e-5  # CLIP: 1e-5; SigLIP: 1e-6
    select_layer: int = -2  # penultimate, as CLIP's last layer is tuned to global image-text match
    select_feature: str = "patch"  # "patch" drops CLS, "cls_patch" keeps it (SigLIP has none)

    @property
    def has_cls(self):  # CLIP has a class token and a LayerNorm before the encoder; SigLIP neither
        return self.model_type == "clip_vision_model"

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_layers_run(self):
        # hidden state 0 is the embeddings, i layer i's output: state k < 0 needs L + 1 + k layers
        L = self.num_hidden_layers
        n = self.select_layer if self.select_layer >= 0 else L + 1 + self.select_layer
        if not 0 <= n <= L:
            raise InputError(f"select_layer {self.select_layer} is outside a {L}-layer vision tower")
        return n


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.has_cls = cfg.has_cls
        if cfg.has_cls:
            self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        # a conv with stride = kernel = patch size is "cut into patches + one shared linear layer"
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, bias=not cfg.has_cls)
        self.position_embedding = nn.Embedding(cfg.num_patches + cfg.has_cls, cfg.hidden_size)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values)  # (B, Dv, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, Dv), patches in row-major order
        if self.has_cls:
            cls = self.class_embedding.to(x.dtype).expand(x.size(0), 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + N, Dv)
        return x + self.position_embedding.weight.to(x.dtype)


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention: every patch sees every patch."""
    def __init__(self, cfg):
        super().__init__()
        D, self.n_head = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = (p(x).view(B, T, nh, hs).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs), no mask
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = get_activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm transformer block (LayerNorm with bias, as in CLIP and SigLIP)."""
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg, n_layers):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(n_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class VisionTower(nn.Module):
    """CLIP / SigLIP ViT returning LLaVA's image feature, the hidden state of `select_layer`. Later
    layers never touch it, so they are not built, nor `post_layernorm` or SigLIP's pooling head."""
    def __init__(self, cfg):
        super().__init__()
        if cfg.model_type not in ("clip_vision_model", "siglip_vision_model"):
            raise InputError(f"unsupported vision model_type {cfg.model_type!r}")
        if cfg.select_feature not in ("patch", "cls_patch"):
            raise InputError(f"select_feature must be 'patch' or 'cls_patch', got {cfg.select_feature!r}")
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.has_cls:  # "layrnorm" [sic]: CLIP's key name
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoder(cfg, cfg.num_layers_run)
        self.apply(init_weights)

    @property
    def num_tokens(self):  # image tokens each image contributes to the language model's sequence
        drop_cls = self.config.has_cls and self.config.select_feature == "patch"
        return self.config.num_patches + self.config.has_cls - drop_cls

    def forward(self, pixel_values):
        """(B, 3, H, W) normalised pixels -> (B, N, Dv) features of the selected layer."""
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        if self.config.has_cls:
            x = self.pre_layrnorm(x)
        x = self.encoder(x)
        # LLaVA drops CLS: the LLM gets one token per patch, each tied to a spatial location
        return x[:, 1:] if self.config.has_cls and self.config.select_feature == "patch" else x

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, select_layer=-2, select_feature="patch"):
        """Load a CLIP/SigLIP checkpoint directory: full (text tower ignored) or vision-only."""
        cfg = vision_config_from_hf(read_config(path), select_layer, select_feature)
        model = build_on_meta(cls, cfg)
        load_weights(model, read_safetensors(path, device), path, vision_key, dtype=dtype, device=device)
        return model

    def save_pretrained(self, path):
        """Write a transformers CLIPVisionModel / SiglipVisionModel checkpoint of these layers."""
        os.makedirs(path, exist_ok=True)
        config = vision_config_to_hf(self.config, len(self.encoder.layers))
        write_json(os.path.join(path, "config.json"), config)
        tensors = {"vision_model." + k: v for k, v in state_dict_for_save(self).items()}
        # an identity post_layernorm (LLaVA never uses it) so transformers loads it without warnings
        tensors["vision_model.post_layernorm.weight"] = torch.ones(self.config.hidden_size)
        tensors["vision_model.post_layernorm.bias"] = torch.zeros(self.config.hidden_size)
        save_safetensors(tensors, os.path.join(path, "model.safetensors"))


# -----------------------------------------------------------------------------
# Projector: maps vision features into the language model's embedding space

class Projector(nn.Module):
    """'linear' (LLaVA-1) or 'mlp2x_gelu' (LLaVA-1.5: Linear, GELU, Linear)."""
    def __init__(self, kind, vision_dim, text_dim, bias=True):
        super().__init__()
        if kind not in ("linear", "mlp2x_gelu"):
            raise InputError(f"unsupported projector {kind!r}; supported: 'linear', 'mlp2x_gelu'")
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        if kind == "mlp2x_gelu":
            self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x):
        x = self.linear_1(x)
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(F.gelu(x))
        return x


# -----------------------------------------------------------------------------
# Language model: a Llama-style decoder (Llama, TinyLlama, Vicuna, SmolLM2, Qwen2)

@dataclass
class LMConfig:
    model_type: str = "llama"  # "llama" or "qwen2" (which adds a bias to q/k/v)
    vocab_size: int = 32000  # rows of the embedding table
    hidden_size: int = 4096  # model width D
    intermediate_size: int = 11008  # SwiGLU hidden width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int = 32  # fewer than the query heads: grouped-query attention (GQA)
    head_dim: int = 128  # usually hidden_size // num_attention_heads, but not always
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # base of the rotary frequencies
    max_position_embeddings: int = 2048  # context length the model was trained for (informative)
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    o_proj_bias: bool = False  # bias on the attention output (Llama's attention_bias covers it too)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False  # lm_head is the embedding matrix (SmolLM2, small Qwen2.5)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None  # generation stops at any of these


class KVCache:
    """Every layer's keys and values, preallocated once per generation: (L, B, n_kv, T_max, hs)."""
    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    def update(self, layer, k, v):
        """Store this step's (B, n_kv, T, hs) keys/values; return all of them so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class LlamaAttention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx, D = layer_idx, cfg.hidden_size
        self.n_head, self.n_kv, self.hs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(D, self.n_head * self.hs, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.hs, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.hs, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * self.hs, D, bias=cfg.o_proj_bias)
        # set by explain.py: attend explicitly and keep the weights (B, nh, T, S) in .attention
        self.keep_attention, self.attention = False, None

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        nh, n_kv, hs = self.n_head, self.n_kv, self.hs
        q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, n_kv, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, n_kv, hs).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hs), S = cached + T
        # GQA: each group of nh / n_kv query heads shares one key/value head. `mask` is a tensor,
        # "causal" or None (one new token sees the whole cache); never both: some SDPA backends fail
        gqa = n_kv != nh
        if self.keep_attention:
            y, self.attention = explicit_attention(q, k, v, mask)
        elif isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=mask == "causal", enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hs))


def explicit_attention(q, k, v, mask):
    """What SDPA computes, spelled out, with the weights it does not return: softmax(q k^T / sqrt(hs))
    over the keys a query may see, times v. q (B, nh, T, hs), k and v (B, n_kv, S, hs), mask as
    LlamaAttention takes it -> (B, nh, T, hs) and the weights (B, nh, T, S), each row summing to 1."""
    T, S, hs = q.size(2), k.size(2), q.size(3)
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, nh, S, hs): a kv head per group
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = (q @ k.transpose(-2, -1)).float() / hs**0.5  # (B, nh, T, S)
    if mask == "causal":  # SDPA's is_causal: query t sees keys 0..t (used only when T == S)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if isinstance(mask, torch.Tensor):
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1)
    return weights.to(v.dtype) @ v, weights


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    def __init__(self, cfg):
        super().__init__()
        D, H = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, H, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(D, H, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(H, D, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder body; its keys are the checkpoint's `model.*`."""
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # recompute layer activations in backward: less memory

    def forward(self, x, cos, sin, mask, cache=None):
        """(B, T, D) -> (B, T, D) hidden states; the caller computes cos/sin and mask once."""
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


def attention_mask_4d(attention_mask, T, past):
    """Boolean (B, 1, T, S) mask of T new queries over S = past + T keys: causal AND not padding.
    A query always sees itself: no row is empty (softmax would give NaN); padding rows go unused."""
    S = past + T
    q_pos = torch.arange(past, S, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None] & attention_mask[:, None, :].bool()  # (B, T, S)
    return (mask | (k_pos == q_pos)[None])[:, None]  # (B, 1, T, S)


def padding_mask(attention_mask, only_real=False):
    """attention_mask, or None where SDPA's is_causal gives the same: no padding, or, when the caller
    reads only the real positions (only_real: a training loss), padding only after each row's tokens,
    which causal attention already hides from them. is_causal is faster, and on a GPU the only way to
    SDPA's flash kernel. Callers decide: reading the mask in LanguageModel.forward would stall the GPU
    and break a compiled graph."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    if only_real and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None
    return attention_mask


class LanguageModel(nn.Module):
    """Llama-family causal LM with LlamaForCausalLM / Qwen2ForCausalLM's keys: model.*, lm_head."""
    def __init__(self, cfg):
        super().__init__()
        if cfg.model_type not in ("llama", "qwen2"):
            raise InputError(f"unsupported language model_type {cfg.model_type!r}")
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(init_weights)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None,
                last_only=False, hidden=False):
        """input_ids (B, T) or inputs_embeds (B, T, D) -> logits (B, T, V), (B, 1, V) if last_only,
        or hidden states (B, T, D) if hidden. attention_mask (B, S) marks real tokens (1), cached
        ones included; positions count real tokens only, so a left-padded prompt starts at 0."""
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = 0 if cache is None else cache.pos
        if attention_mask is None:
            positions = torch.arange(past, past + T, device=x.device).expand(B, T)
            if T == 1 or past == 0:  # SDPA's is_causal aligns top-left: right only with no cache
                mask = None if T == 1 else "causal"  # one new token may see everything before it
            else:
                mask = attention_mask_4d(torch.ones(B, past + T, device=x.device), T, past)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            mask = attention_mask_4d(attention_mask, T, past)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        x = self.model(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        if last_only:  # generation needs the next token's logits only: skip the prompt's (T, V)
            x = x[:, -1:]
        return x if hidden else self.lm_head(x)

    def compile(self, *args, **kwargs):
        """torch.compile the decoder body in place; the rest stays eager, so RoPE's cos/sin enter
        the graph as inputs instead of being recomputed in every layer, forward and backward."""
        self.model.compile(*args, **kwargs)

    @torch.no_grad()
    def stream(self, inputs_embeds, attention_mask=None, max_new_tokens=64, temperature=0.0,
               top_p=1.0, eos_token_id=None, generator=None):
        """Yield every row's next token, (B,), after left-padded prompts given as embeddings
        (B, T, D), with a KV cache. A finished row repeats its end token (cut at it)."""
        B, T, _ = inputs_embeds.shape
        eos = eos_token_id if eos_token_id is not None else self.config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=inputs_embeds.device)
        # under autocast the projections emit keys and values in the autocast dtype: cache in it too
        kind = inputs_embeds.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else inputs_embeds.dtype
        cache = KVCache(self.config, B, T + max_new_tokens, device=inputs_embeds.device, dtype=dtype)
        mask = padding_mask(attention_mask)  # None: the cache gives positions and causality

        def next_logits(mask, **inputs):  # -> (B, V)
            # eagerly, even in a compiled model: the compiled body would recompile per cache length
            with torch.compiler.set_stance("force_eager"):
                return self(**inputs, attention_mask=mask, cache=cache, last_only=True)[:, -1]

        logits = next_logits(mask, inputs_embeds=inputs_embeds)  # prefill
        done = torch.zeros(B, dtype=torch.bool, device=inputs_embeds.device)
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)  # (B,)
            token = torch.where(done, eos[0] if len(eos) else token, token)
            yield token
            done |= torch.isin(token, eos)
            if i == max_new_tokens - 1 or bool(done.all()):
                return
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            logits = next_logits(mask, input_ids=token[:, None])

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load a LlamaForCausalLM / Qwen2ForCausalLM directory (one or sharded safetensors)."""
        cfg = lm_config_from_hf(read_config(path))
        model = build_on_meta(cls, cfg)
        load_weights(model, read_safetensors(path, device), path, lm_key, dtype=dtype, device=device)
        return model

    def save_pretrained(self, path):
        """Write a transformers LlamaForCausalLM / Qwen2ForCausalLM checkpoint."""
        os.makedirs(path, exist_ok=True)
        write_json(os.path.join(path, "config.json"), lm_config_to_hf(self.config))
        save_safetensors(state_dict_for_save(self), os.path.join(path, "model.safetensors"))


def init_weights(module):
    # small normal weights (GPT-2, Llama) for models trained from scratch; checkpoints replace them
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# -----------------------------------------------------------------------------
# LLaVA: vision tower + projector + language model

def shifted_cross_entropy(logits, labels):
    """Mean next-token loss over the trained (label != -100) positions. Labels align with the
    inputs, so logits at t are scored against labels[t + 1]: shifting here, once, keeps every data
    path free of off-by-one mistakes. A batch without a trained token gives 0, not NaN."""
    # shift the labels, not the (B, T, V) logits: slicing those would copy them, twice with backward
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T); the last predicts nothing
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def trained_cross_entropy(hidden, labels, lm_head):
    """shifted_cross_entropy's summed loss and target count, from hidden states (B, T, D). lm_head
    runs only where the next token is trained: the same loss, without a step's largest tensor."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T), as shifted_cross_entropy
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden[keep])  # (n, V): the trained positions only, in row-major order
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()


class TinyLlava(nn.Module):
    def __init__(self, vision_tower, language_model, projector="mlp2x_gelu", projector_bias=True):
        super().__init__()
        self.vision_tower, self.language_model = vision_tower, language_model
        w = language_model.model.embed_tokens.weight
        Dv, D = vision_tower.config.hidden_size, language_model.config.hidden_size
        with torch.device(w.device):  # a fresh projector keeps the default Linear init, as in LLaVA
            self.multi_modal_projector = Projector(projector, Dv, D, projector_bias).to(w.dtype)
        self.source_dir = None  # where tokenizer files come from (copied by save_pretrained)
        self.sources = {}  # the vision / LLM checkpoints it was built from (written to config.json)
        self.chat = {}  # how to talk to it as trained (data.ChatConfig's fields; set by training)

    @property
    def config(self):
        return llava_config_to_hf(self)

    def encode_images(self, pixel_values):
        """(n_img, 3, H, W) -> (n_img, N, D) image tokens in the LM's embedding space."""
        # no graph through a frozen tower: saves the activations' memory and a useless backward pass
        tower, projector = self.vision_tower, self.multi_modal_projector
        train_vision = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(train_vision):
            features = tower(pixel_values)
        return projector(features.to(projector.linear_1.weight.dtype))

    def merge_inputs(self, input_ids, pixel_values=None, attention_mask=None, labels=None):
        """Replace each -200 of input_ids (B, T) by its image's N features, from pixel_values
        (n_img, 3, H, W) in placeholder order -> embeddings, mask, labels or None (B, T'), where
        image positions get label -100."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_image = input_ids == IMAGE_TOKEN_INDEX
        n_img, n_pix = int(is_image.sum()), 0 if pixel_values is None else pixel_values.size(0)
        if n_img != n_pix:
            raise ValueError(f"{n_img} image placeholders ({IMAGE_TOKEN_INDEX}) in input_ids "
                             f"but {n_pix} images")
        embeds = self.language_model.model.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D)
        if n_img == 0:
            return embeds, attention_mask, labels
        images = self.encode_images(pixel_values).to(embeds.dtype)  # (n_img, N, D)
        return splice_images(input_ids, embeds, images, attention_mask, labels)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, return_logits=True):
        """-> (logits (B, T', V), loss or None), T' counting image tokens. With return_logits=False
        logits are None: same loss, lm_head only on trained positions (trained_cross_entropy)."""
        embeds, mask, labels = self.merge_inputs(input_ids, pixel_values, attention_mask, labels)
        mask = padding_mask(mask, only_real=labels is not None and not return_logits)
        if labels is not None and not return_logits:
            hidden = self.language_model(inputs_embeds=embeds, attention_mask=mask, hidden=True)
            total, n = trained_cross_entropy(hidden, labels, self.language_model.lm_head)
            return None, total / n.clamp(min=1)
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask)
        loss = shifted_cross_entropy(logits, labels) if labels is not None else None
        return logits, loss

    def compile(self, *args, **kwargs):
        """torch.compile the vision tower and LM body, not the glue: its shapes follow the data."""
        self.vision_tower.compile(*args, **kwargs)
        self.language_model.compile(*args, **kwargs)

    # --- generation ----------------------------------------------------------
    @torch.no_grad()
    def stream(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64,
               temperature=0.0, top_p=1.0, eos_token_id=None, generator=None):
        """Yield every row's next token, (B,), with a KV cache (LanguageModel.stream). Prompts must
        be left-padded: all rows' next tokens go in one column."""
        embeds, mask, _ = self.merge_inputs(input_ids, pixel_values, attention_mask)
        yield from self.language_model.stream(
            embeds, attention_mask=mask, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, eos_token_id=eos_token_id, generator=generator)

    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64,
                 temperature=0.0, top_p=1.0, eos_token_id=None, generator=None):
        """-> new token ids (B, n_new); a finished row is filled with the end token after it."""
        tokens = list(self.stream(input_ids, pixel_values, attention_mask, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                                  generator=generator))
        return torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.size(0), 0)

    # --- loading and saving --------------------------------------------------
    @classmethod
    def from_parts(cls, vision_dir, llm_dir, projector="mlp2x_gelu", select_layer=-2,
                   select_feature="patch", dtype=None, device=None):
        """A new LLaVA from a pretrained vision tower and LLM; stage 1 trains the new projector."""
        vision = VisionTower.from_pretrained(vision_dir, dtype, device, select_layer=select_layer,
                                             select_feature=select_feature)
        lm = LanguageModel.from_pretrained(llm_dir, dtype, device)
        model = cls(vision, lm, projector)
        model.source_dir = llm_dir
        model.sources = {"vision": os.path.abspath(vision_dir), "llm": os.path.abspath(llm_dir)}
        return model

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load ours or a transformers LlavaForConditionalGeneration checkpoint (either layout)."""
        d, where = read_config(path), f"{path}/config.json"
        if d.get("model_type") != "llava":
            raise InputError(f"{where}: model_type {d.get('model_type')!r} is not 'llava'")
        if not {"vision_config", "text_config"} <= d.keys():
            raise InputError(f"{where}: a LLaVA config needs a vision_config and a text_config")
        layer = d.get("vision_feature_layer", -2)
        strategy = d.get("vision_feature_select_strategy", "default")
        if not isinstance(layer, int):
            raise InputError(f"{where}: vision_feature_layer {layer!r}: only a single layer is supported")
        if strategy not in ("default", "full"):
            raise InputError(f"{where}: unsupported vision_feature_select_strategy {strategy!r}")
        if d.get("projector_hidden_act", "gelu") != "gelu":
            raise InputError(f"{where}: unsupported projector_hidden_act {d['projector_hidden_act']!r}")
        feature = "patch" if strategy == "default" else "cls_patch"
        vcfg = vision_config_from_hf(d["vision_config"], layer, feature)
        tcfg = lm_config_from_hf(d["text_config"])
        with torch.device("meta"):
            model = cls(VisionTower(vcfg), LanguageModel(tcfg), d.get("projector_type", "mlp2x_gelu"),
                        d.get("multimodal_projector_bias", True))
        load_weights(model, read_safetensors(path, device), path, llava_key, dtype=dtype, device=device)
        model.source_dir = path
        model.sources, model.chat = d.get("tinyllava_sources", {}), d.get("tinyllava_chat", {})
        return model

    def save_pretrained(self, path, image_token_id=None):
        """config.json + model.safetensors (+ tokenizer files), with transformers' LLaVA keys.
        image_token_id: the tokenizer's id for the image tag, which transformers looks up in the
        embedding table before putting the image there (chat.save_checkpoint adds the token); a
        table without a row to spare for it grows, the new rows the mean row (as transformers'
        resize_token_embeddings centres them: an unremarkable logit, not 0). None: -200, which only
        tinyllava reads."""
        os.makedirs(path, exist_ok=True)
        config, tensors = self.config, state_dict_for_save(self)
        if image_token_id is not None:
            config["image_token_index"] = image_token_id
            extra = image_token_id + 1 - self.language_model.config.vocab_size
            if extra > 0:
                for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
                    if k in tensors:  # a tied lm_head is saved once, as the embedding
                        mean = tensors[k].mean(0, keepdim=True)
                        tensors[k] = torch.cat([tensors[k], mean.expand(extra, -1)])
                config["text_config"]["vocab_size"] += extra
        # an identity post_layernorm (LLaVA never uses it) so transformers loads it without warnings
        D = self.vision_tower.config.hidden_size
        tensors["vision_tower.post_layernorm.weight"] = torch.ones(D)
        tensors["vision_tower.post_layernorm.bias"] = torch.zeros(D)
        write_json(os.path.join(path, "config.json"), config)
        save_safetensors(tensors, os.path.join(path, "model.safetensors"))
        if self.source_dir and os.path.abspath(self.source_dir) != os.path.abspath(path):
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(self.source_dir, name)):
                    shutil.copy(os.path.join(self.source_dir, name), os.path.join(path, name))


def splice_images(input_ids, embeds, images, attention_mask, labels=None):
    """The -200 splice: input_ids (B, T), embeddings (B, T, D), images (n_img, N, D) in placeholder
    order -> (B, T', D), mask, labels. A text token takes 1 position, a placeholder N, padding 0: a
    running sum of these widths says where each lands, and two scatters fill the whole batch."""
    B, N = input_ids.size(0), images.size(1)
    real = attention_mask.bool()
    is_image = (input_ids == IMAGE_TOKEN_INDEX) & real
    width = real.long() + (N - 1) * is_image.long()  # (B, T): 1, N, or 0 for padding
    end = width.cumsum(1)  # (B, T): where each token's span ends in its spliced row
    length = end[:, -1:]  # (B, 1): the spliced rows' lengths
    T2 = int(length.max())
    # padding keeps its side: right for training, left for generation (all prompts end at T2); left
    # padding shows as a row that starts with padding and ends with a token (all padding: no sign)
    left_padded = bool((~real[:, 0] & real[:, -1]).any())
    shift = T2 - length if left_padded else torch.zeros_like(length)  # (B, 1): each row's start
    start = end - width + shift  # (B, T): each token's first position
    out = embeds.new_zeros(B, T2, embeds.size(-1))
    rows, cols = (real & ~is_image).nonzero(as_tuple=True)  # the text tokens
    to = start[rows, cols]  # their positions in the spliced rows
    out[rows, to] = embeds[rows, cols]
    img_rows, img_cols = is_image.nonzero(as_tuple=True)  # row by row, the order of `images`
    span = start[img_rows, img_cols, None] + torch.arange(N, device=start.device)  # (n_img, N)
    out[img_rows[:, None], span] = images
    p = torch.arange(T2, device=start.device)
    out_mask = ((p >= shift) & (p < shift + length)).to(attention_mask.dtype)
    out_labels = None
    if labels is not None:  # an image predicts nothing: its positions keep -100
        out_labels = torch.full((B, T2), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
        out_labels[rows, to] = labels[rows, cols]
    return out, out_mask, out_labels


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """(B, V) logits -> (B,) tokens: greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest set of top tokens whose mass reaches top_p (the top one always stays)
        p[(p.cumsum(-1) - p) >= top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, idx, p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def parameter_table(model):
    """part / parameters / trainable, one row per part (and the LLM's LoRA adapters, if any)."""
    rows = [("part", "parameters", "trainable")]
    for name, part in (("vision", model.vision_tower), ("projector", model.multi_modal_projector),
                       ("llm", model.language_model)):
        params = list(part.parameters())
        rows.append((name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    total = ("total", sum(r[1] for r in rows[1:]), sum(r[2] for r in rows[1:]))
    adapters = [p for m in model.language_model.modules() if isinstance(m, LoRALinear)
                for p in (m.lora_A, m.lora_B)]
    if adapters:  # counted in the llm row too
        rows.append(("  of which LoRA", sum(p.numel() for p in adapters),
                     sum(p.numel() for p in adapters if p.requires_grad)))
    rows.append(total)
    return "\n".join(f"{a:<16} {b:>14,} {c:>14,}" if i else f"{a:<16} {b:>14} {c:>14}"
                     for i, (a, b, c) in enumerate(rows))

# -----------------------------------------------------------------------------
# LoRA: a trainable low-rank update beside frozen weights (Hu et al. 2021)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B(A(dropout(x))): a frozen nn.Linear and a rank-r update. B starts at 0,
    so training starts from exactly the pretrained model; merged() folds B A into the weight."""
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base, self.scale = base, alpha / r
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)  # as nn.Linear initialises a weight (peft too)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + self.scale * (self.dropout(x) @ self.lora_A.T @ self.lora_B.T)

    def merged(self):
        """An nn.Linear equal to this layer (in eval): W + scale * B @ A, in the weight's dtype."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)  # bf16 weights: summed in fp32
        with torch.no_grad():
            delta = self.lora_B.to(dtype) @ self.lora_A.to(dtype) * self.scale  # (out, in)
            linear.weight.copy_(self.base.weight.to(dtype) + delta)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        linear.requires_grad_(self.base.weight.requires_grad)
        return linear


def add_lora(language_model, r, alpha, dropout=0.0, targets=LORA_TARGETS):
    """Freeze language_model and wrap each decoder projection named in targets (q_proj, ... down_proj)
    in a LoRALinear; returns the adapters' parameters, the only trainable ones in it."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown or r < 1:
        raise InputError(f"LoRA rank {r}, targets {sorted(targets)}: the rank must be at least 1 and "
                         f"the targets among {', '.join(LORA_TARGETS)}")
    language_model.requires_grad_(False)
    params = []
    for layer in language_model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name in targets:
                if isinstance(getattr(block, name, None), nn.Linear):
                    lora = LoRALinear(getattr(block, name), r, alpha, dropout).train(language_model.training)
                    setattr(block, name, lora)
                    params += [lora.lora_A, lora.lora_B]
    return params


def lora_state(module):
    """The adapters alone: {module path + ".lora_A" / ".lora_B": tensor}, e.g. for a small file."""
    return {f"{n}.{k}": getattr(m, k).detach() for n, m in module.named_modules() if isinstance(m, LoRALinear)
            for k in ("lora_A", "lora_B")}


def merge_lora(module):
    """Replace every LoRALinear in module by its merged nn.Linear, in place: an ordinary model again,
    whose checkpoint any Llama / LLaVA loader reads."""
    for name, m in list(module.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, m.merged())
    return module


# -----------------------------------------------------------------------------
# Configs: from and to the checkpoints' own config.json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "preprocessor_config.json", "chat_template.jinja")

# transformers' defaults for fields that a config.json may leave out
VISION_DEFAULTS = {
    "clip_vision_model": dict(patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
LM_DEFAULTS = {
    "llama": dict(vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048),
    "qwen2": dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768),
}


def read_config(path):
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise InputError(f"no config.json in {path!r}")
    with open(file) as f:
        return json.load(f)


def write_json(file, obj):
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, file)  # atomic: a reader never sees half a file


def vision_config_from_hf(d, select_layer=-2, select_feature="patch"):
    if d.get("model_type") in ("clip", "siglip"):  # a full CLIP / SigLIP: take its vision half
        d = {**d.get("vision_config", {}), "model_type": d["model_type"] + "_vision_model"}
    mt = d.get("model_type")
    if mt not in VISION_DEFAULTS:
        raise InputError(f"unsupported vision model_type {mt!r}; "
                         "supported: clip, siglip and their vision models")
    fields = {**asdict(VisionConfig()), **VISION_DEFAULTS[mt]}
    ours = ("select_layer", "select_feature")  # LLaVA's choice, not the checkpoint's
    cfg = VisionConfig(**{k: d.get(k, v) for k, v in fields.items() if k not in ours},
                       select_layer=select_layer, select_feature=select_feature)
    get_activation(cfg.hidden_act)  # fail now, naming it, rather than at the first forward
    return cfg


def vision_config_to_hf(cfg, num_layers):
    d = {k: v for k, v in asdict(cfg).items() if k not in ("select_layer", "select_feature")}
    arch = {"clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel"}
    return {**d, "num_hidden_layers": num_layers, "architectures": [arch[cfg.model_type]]}


def lm_config_from_hf(d):
    mt = d.get("model_type")
    if mt not in LM_DEFAULTS:
        raise InputError(f"unsupported language model_type {mt!r}; supported: {sorted(LM_DEFAULTS)}")
    get_activation(d.get("hidden_act", "silu"))
    if d.get("hidden_act", "silu") != "silu":
        raise InputError(f"unsupported hidden_act {d['hidden_act']!r} for a Llama-style MLP "
                         "(expected 'silu')")
    # newer transformers write rope settings as a `rope_parameters` dict, older as top-level keys
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise InputError(f"unsupported rope scaling {rope_type!r} (only plain RoPE is implemented)")
    if d.get("use_sliding_window") or any(t != "full_attention" for t in d.get("layer_types") or []):
        raise InputError("unsupported sliding-window attention (use_sliding_window / layer_types)")
    f = {**asdict(LMConfig()), **LM_DEFAULTS[mt], **{k: v for k, v in d.items() if k in asdict(LMConfig())}}
    f["num_key_value_heads"] = d.get("num_key_value_heads") or f["num_attention_heads"]
    f["head_dim"] = d.get("head_dim") or f["hidden_size"] // f["num_attention_heads"]
    f["rope_theta"] = float(d.get("rope_theta", rope.get("rope_theta", 10000.0)))
    # Llama's attention_bias covers q, k, v and o; Qwen2 always has q/k/v biases and never an o bias
    f["attention_bias"] = mt == "qwen2" or bool(d.get("attention_bias", False))
    f["o_proj_bias"] = mt == "llama" and bool(d.get("attention_bias", False))
    return LMConfig(**f)


def lm_config_to_hf(cfg):
    d = asdict(cfg)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    if cfg.model_type == "qwen2":
        del d["attention_bias"]
    del d["o_proj_bias"]
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.model_type]
    return {**d, "hidden_act": "silu", "architectures": [arch]}


def llava_config_to_hf(model):
    v = model.vision_tower.config
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": vision_config_to_hf(v, len(model.vision_tower.encoder.layers)),
        "text_config": lm_config_to_hf(model.language_model.config),
        # the built tower ends at the selected layer: the feature is its last hidden state
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default" if v.select_feature == "patch" else "full",
        "projector_hidden_act": "gelu",
        "projector_type": model.multi_modal_projector.kind,  # tinyllava's: 'linear' or 'mlp2x_gelu'
        "multimodal_projector_bias": model.multi_modal_projector.linear_1.bias is not None,
        "image_token_index": IMAGE_TOKEN_INDEX,
        "tie_word_embeddings": model.language_model.config.tie_word_embeddings,
        "tinyllava_sources": model.sources, "tinyllava_chat": model.chat,
    }


# -----------------------------------------------------------------------------
# Weights: strict loading, near-identity key maps

def read_safetensors(path, device=None):
    """All tensors of a checkpoint directory (one file or sharded), read straight onto `device`."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise InputError(f"no model.safetensors or model.safetensors.index.json in {path!r} "
                         "(only safetensors is supported)")
    tensors = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt", device=str(device or "cpu")) as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def vision_key(k):
    """CLIP/SigLIP checkpoint key -> VisionTower key, or None to ignore it deliberately."""
    k = k.removeprefix("vision_model.")
    unused = ("text_model.", "text_projection", "visual_projection", "logit_", "post_layernorm", "head.")
    return None if k.startswith(unused) else k  # text tower, contrastive heads, parts LLaVA skips


def lm_key(k):
    return k  # LanguageModel copies LlamaForCausalLM's names exactly


def llava_key(k):
    """LLaVA key -> ours, from the hub layout (language_model.model.*) or the newer (model.*)."""
    if k.startswith("model.language_model."):
        return "language_model.model." + k.removeprefix("model.language_model.")
    if k == "lm_head.weight":
        return "language_model.lm_head.weight"
    k = k.removeprefix("model.")
    if k.startswith("vision_tower."):
        inner = vision_key(k.removeprefix("vision_tower."))
        return None if inner is None else "vision_tower." + inner
    return k


def load_weights(model, tensors, path, key_map, dtype=None, device=None):
    """Fill every parameter of `model` (maybe on meta) from `tensors`, strictly: each key maps to
    one, is ignored (key_map gives None, or a vision layer past the feature), or is an error."""
    params = dict(model.named_parameters())  # tied weights appear once
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - params.keys()
    mapped, unexpected = {}, []
    for k, t in tensors.items():
        name = key_map(k)
        if name is None or name in tied or skipped_vision_layer(model, name):
            continue
        if name in params:
            mapped[name] = t
        else:
            unexpected.append(k)
    missing = sorted(params.keys() - mapped.keys())
    wrong = [f"{n}: checkpoint {tuple(mapped[n].shape)} vs model {tuple(params[n].shape)}"
             for n in params if n in mapped and mapped[n].shape != params[n].shape]
    problems = [("missing key", missing), ("unexpected key", sorted(unexpected)), ("wrong shape", wrong)]
    if any(keys for _, keys in problems):  # one line, the first few of each kind
        raise InputError(f"cannot load {path!r}: " + "; ".join(
            f"{kind}: " + ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            for kind, keys in problems if keys))
    for name, p in params.items():
        module_name, _, attr = name.rpartition(".")
        t = mapped[name].to(device=device or mapped[name].device, dtype=dtype or torch.float32)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(t, requires_grad=p.requires_grad))
    for lm in (m for m in model.modules() if isinstance(m, LanguageModel) and m.config.tie_word_embeddings):
        lm.lm_head.weight = lm.model.embed_tokens.weight  # re-tie: setattr replaced the shared one


def skipped_vision_layer(model, name):
    """True for weights of vision layers past the selected feature (never run, so never built)."""
    tower = model if isinstance(model, VisionTower) else getattr(model, "vision_tower", None)
    prefix = "" if isinstance(model, VisionTower) else "vision_tower."
    if tower is None or not name.startswith(prefix + "encoder.layers."):
        return False
    return int(name.removeprefix(prefix + "encoder.layers.").split(".")[0]) >= len(tower.encoder.layers)


def build_on_meta(cls, cfg):
    # no weights allocated or initialised (the checkpoint has them all): no 7B fp32 copy on the CPU
    with torch.device("meta"):
        return cls(cfg)


def state_dict_for_save(model):
    """The model's tensors without duplicates (a tied lm_head once, as transformers stores it)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise InputError("the model has LoRA adapters: merge_lora(model) first (an ordinary checkpoint), "
                         "or save lora_state(model) (the adapters alone)")
    return {k: p.detach().contiguous() for k, p in model.named_parameters()}


def save_safetensors(tensors, file):
    tmp = file + ".tmp"
    save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, file)


def command_line(main):
    """Run main(): a user's mistake prints `error: <message>`, exit 2; a bug keeps its traceback."""
    try:
        main()
    except (InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
