"""Exercise 6: grouped-query attention with a KV cache."""

import torch
import torch.nn.functional as F

import tinyllava as tl

from .framework import describe, diagnose, exercise, gen, max_diff, patched
from .toy import TEXT, tiny_model

sdpa = F.scaled_dot_product_attention


def attention_ref(q, k, v, past_k=None, past_v=None):
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    T, S = q.size(2), k.size(2)
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # query i sits at position S - T + i
    return sdpa(q, k, v, attn_mask=mask, enable_gqa=True), k, v


def student_attention_forward(fn):
    """A LlamaAttention.forward that calls the student's function in place of SDPA +
    KVCache.update."""
    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        past = 0 if cache is None else cache.pos
        no_padding = tl.attention_mask_4d(torch.ones(B, past + T), T, past)
        if isinstance(mask, torch.Tensor) and not torch.equal(mask, no_padding):
            raise RuntimeError("checker: the exercise has no padding mask, so it is only plugged "
                               "into unpadded batches")
        q = tl.apply_rope(self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2), cos, sin)
        k = tl.apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)
        if past == 0:
            y, k_all, v_all = fn(q, k, v)
        else:
            i = self.layer_idx
            y, k_all, v_all = fn(q, k, v, cache.k[i, :, :, :past], cache.v[i, :, :, :past])
        # tinyllava's cache is preallocated: write what the function returned back into it
        if cache is not None:
            cache.k[self.layer_idx, :, :, : k_all.size(2)] = k_all
            cache.v[self.layer_idx, :, :, : v_all.size(2)] = v_all
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hs))
    return forward


@exercise(6, "06_gqa_kv_cache", "attention", "grouped-query attention with a KV cache")
def check_attention(fn, c):
    g = gen(6)
    B, nh, n_kv, hs = 2, 4, 2, 8
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = r(B, nh, 5, hs), r(B, n_kv, 5, hs), r(B, n_kv, 5, hs)
    out = fn(q, k, v)
    c.check("returns (y, keys, values)", isinstance(out, tuple) and len(out) == 3,
            expected="a tuple of 3", got=describe(out))
    y = out[0]
    want = attention_ref(q, k, v)[0]
    rep = lambda t: t.repeat(1, nh // n_kv, 1, 1)  # noqa: E731
    mistakes = [(lambda: sdpa(q, rep(k), rep(v), is_causal=True),
                 "query head h must use key/value head h // (n_heads / n_kv_heads): heads 0,1 "
                 "share kv head 0. tensor.repeat tiles the heads (0,1,0,1); repeat_interleave "
                 "gives (0,0,1,1)"),
                (lambda: sdpa(q, k, v, enable_gqa=True),
                 "a decoder is causal: position i may only attend to positions <= i"),
                (lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True, scale=1.0),
                 "scale the scores by 1 / sqrt(head_dim)")]
    default = "scores = q @ k^T / sqrt(head_dim), causal mask, softmax, @ v"
    c.close("no cache: equals causal attention with kv heads shared by groups of query heads",
            y, want, hint=diagnose(y, mistakes, default))
    c.check("no cache: returns the keys and values to cache (here: the new ones)",
            max_diff(out[1], k) == 0 and max_diff(out[2], v) == 0,
            expected=f"keys/values of shape {tuple(k.shape)}",
            got=f"{describe(out[1])} / {describe(out[2])}")
    P = 3
    pk, pv = r(B, n_kv, P, hs), r(B, n_kv, P, hs)
    top_left_hint = ("the new queries are the LAST T positions: query i sits at position P + i and "
                     "sees keys 0..P+i. (SDPA's is_causal=True aligns the mask top-left, which is "
                     "wrong when T < S)")
    default = "concatenate past and new keys/values along the time axis (dim 2) before attending"
    for T, what in ((1, "one new token (decoding)"),
                    (4, "a chunk of 4 new tokens after 3 cached ones")):
        q2, k2, v2 = r(B, nh, T, hs), r(B, n_kv, T, hs), r(B, n_kv, T, hs)
        y2, kk, vv = fn(q2, k2, v2, pk, pv)
        want, want_k, want_v = attention_ref(q2, k2, v2, pk, pv)
        top_left = sdpa(q2, torch.cat([pk, k2], 2), torch.cat([pv, v2], 2), is_causal=True,
                        enable_gqa=True)
        c.close(f"with a cache, {what}: equals attention over cached + new keys", y2, want,
                hint=diagnose(y2, [(top_left, top_left_hint)], default))
        c.check(f"with a cache, {what}: returns past + new keys/values in order",
                max_diff(kk, want_k) == 0 and max_diff(vv, want_v) == 0,
                expected=f"torch.cat([past, new], dim=2), shape {tuple(want_k.shape)}",
                got=describe(kk))
    for n in (1, nh):
        k1, v1 = r(B, n, 5, hs), r(B, n, 5, hs)
        kind = "multi-query" if n == 1 else "plain multi-head"
        c.close(f"works with {n} key/value head(s) ({kind} attention)",
                fn(q, k1, v1)[0], attention_ref(q, k1, v1)[0])
    # plugged into the real decoder: tinyllava's attention, with your function in place of
    # SDPA + KVCache.update
    model = tiny_model(random_weights=True)
    lm = model.language_model
    ids = torch.randint(0, TEXT["vocab_size"], (2, 9), generator=g)
    with torch.no_grad():
        full_ref = lm(ids)
        want_gen = model.generate(ids[:, :5], max_new_tokens=6)
        with patched(tl.LlamaAttention, "forward", student_attention_forward(fn)):
            full = lm(ids)
            c.close("plugged into the decoder: full-sequence logits are unchanged",
                    full, full_ref, 1e-4)
            cache = tl.KVCache(lm.config, 2, 9, ids.device, torch.float32)
            steps = [lm(ids[:, :5], cache=cache), lm(ids[:, 5:8], cache=cache),
                     lm(ids[:, 8:], cache=cache)]
            c.close("cached == uncached: prefill 5, then a chunk of 3, then 1 token give the full "
                    "forward's logits", torch.cat(steps, 1), full_ref, 1e-4,
                    hint="the cache must hold keys/values of every earlier position, in order")
            got_gen = model.generate(ids[:, :5], max_new_tokens=6)
    c.check("greedy generation with the KV cache gives the same tokens as tinyllava",
            torch.equal(got_gen, want_gen), expected=want_gen.tolist(), got=got_gen.tolist())
