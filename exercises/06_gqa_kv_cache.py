"""Exercise 6: grouped-query attention with a KV cache. Task: exercises/06_gqa_kv_cache.md
Check: python exercises/check.py 6"""

import math  # noqa: F401

import torch  # noqa: F401


def attention(q, k, v, past_k=None, past_v=None):
    """q (B, n_heads, T, hs): queries of the T new positions (rotary embedding already applied);
    k, v (B, n_kv_heads, T, hs): their keys and values; n_heads is a multiple of n_kv_heads.
    past_k, past_v (B, n_kv_heads, P, hs): the cached keys and values of the P earlier positions,
    or None.

    Return (y, k_all, v_all): y (B, n_heads, T, hs) the causal attention output of the new
    positions over all P + T positions, and k_all, v_all (B, n_kv_heads, P + T, hs) to cache for
    the next call."""
    raise NotImplementedError
