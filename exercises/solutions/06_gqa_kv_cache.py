"""Solution to exercise 6, written out with plain tensor ops (tinyllava.py uses SDPA with
enable_gqa)."""

import math

import torch


def attention(q, k, v, past_k=None, past_v=None):
    B, nh, T, hs = q.shape
    if past_k is not None:
        k = torch.cat([past_k, k], dim=2)  # (B, n_kv, S, hs), S = P + T
        v = torch.cat([past_v, v], dim=2)
    S = k.size(2)
    group = nh // k.size(1)  # query heads per key/value head
    # query head h uses key/value head h // group: heads 0..group-1 share kv head 0, and so on
    k_rep = k.repeat_interleave(group, dim=1)  # (B, nh, S, hs)
    v_rep = v.repeat_interleave(group, dim=1)
    att = q @ k_rep.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, S)
    # the T queries are the LAST T positions: query i sits at position S - T + i and sees keys
    # 0..S-T+i
    q_pos = torch.arange(S - T, S, device=q.device)[:, None]
    k_pos = torch.arange(S, device=q.device)[None, :]
    att = att.masked_fill(k_pos > q_pos, float("-inf"))
    y = att.softmax(dim=-1) @ v_rep  # (B, nh, T, hs)
    return y, k, v
