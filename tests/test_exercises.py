"""The classroom exercises' checker can pass and can fail, for the right reasons.

Proves: every reference solution in exercises/solutions/ passes `exercises/check.py`; every unsolved stub
in exercises/ fails with the "not written yet" message that names its function; typical wrong answers
fail with the specific hint meant for them; the command line exits 0 on success and 1 on failure.

Run: python -m pytest -q tests/test_exercises.py
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "exercises"))
import check  # noqa: E402
from checks.c05_rope import rope_interleaved  # noqa: E402
from checks.c07_pad_preprocess import pad_variant  # noqa: E402
from checks.toy import IMAGE  # noqa: E402


@pytest.mark.parametrize("number", sorted(check.EXERCISES))
def test_solution_passes(number, capsys):
    ok = check.run([number], solutions=True)
    out = capsys.readouterr().out
    assert ok, out
    assert f"exercise {number} passes" in out and "FAIL" not in out


def test_stubs_fail_with_todo(capsys):
    assert not check.run(sorted(check.EXERCISES))
    out = capsys.readouterr().out
    for ex in check.EXERCISES.values():
        assert f"TODO  not written yet: fill in `{ex.function}` in exercises/{ex.module}.py" in out
    assert "PASS" not in out and f"0 of {len(check.EXERCISES)} exercises pass" in out


# --- typical mistakes, each with the hint the checker should give ------------


def loss_without_shift(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def freeze_with_attribute(model, stage):
    model.vision_tower.requires_grad = False  # a plain attribute: the parameters stay trainable
    model.language_model.requires_grad = stage == "finetune"


def rope_neighbour_pairs(x, positions, theta):
    return rope_interleaved(x, positions, theta)


def gqa_with_repeat(q, k, v, past_k=None, past_v=None):
    g = q.size(1) // k.size(1)
    return F.scaled_dot_product_attention(q, k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1), is_causal=True), k, v


def cache_with_top_left_mask(q, k, v, past_k=None, past_v=None):
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1, enable_gqa=True), k, v


def pad_with_black(image, size, mean, std):
    return pad_variant(image, size, mean, std, fill=(0, 0, 0))


def pool_consecutive(x):
    n, N, D = x.shape
    if math.isqrt(N) ** 2 != N or math.isqrt(N) % 2:
        raise ValueError(N)
    return x.reshape(n, N // 4, 4, D).mean(2)


def splice_keeping_placeholder(input_ids, image_features, embed_tokens, attention_mask=None, labels=None):
    e = embed_tokens(input_ids.clamp(min=0))
    if image_features is None:
        return e, attention_mask if attention_mask is not None else torch.ones_like(input_ids), labels
    k = int((input_ids[0] == IMAGE).nonzero()[0])
    e = torch.cat([e[:, :k + 1], image_features[:1], e[:, k + 1:]], 1)
    return e, torch.ones(e.shape[:2], dtype=torch.long), labels


def nearest_by_dot_product(tokens, vocab, k):
    return (tokens @ vocab.T).topk(k, dim=-1)


def nearest_by_distance(tokens, vocab, k):
    return (-torch.cdist(tokens, vocab.expand(tokens.size(0), -1, -1))).topk(k, dim=-1)


@pytest.mark.parametrize("number,fn,hint", [
    (1, loss_without_shift, "WITHOUT the shift"),
    (3, splice_keeping_placeholder, "the -200 placeholder itself must disappear"),
    (4, freeze_with_attribute, "only adds an attribute"),
    (5, rope_neighbour_pairs, "pairs x_i with x_{i + head_dim/2}"),
    (6, gqa_with_repeat, "repeat_interleave gives (0,0,1,1)"),
    (6, cache_with_top_left_mask, "the new queries are the LAST T positions"),
    (7, pad_with_black, "pad with the MEAN colour"),
    (8, pool_consecutive, "you averaged 4 CONSECUTIVE tokens"),
    (11, nearest_by_dot_product, "a raw dot product favours long rows"),
    (11, nearest_by_distance, "cosine, not euclidean distance"),
])
def test_mistake_gets_its_hint(number, fn, hint, capsys):
    assert not check.run_one(check.EXERCISES[number], fn=fn)
    out = capsys.readouterr().out
    assert "FAIL" in out and hint in out, out


def test_command_line_exit_codes():
    cmd = [sys.executable, os.path.join(ROOT, "exercises", "check.py"), "1"]
    good = subprocess.run(cmd + ["--solutions"], capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0 and "exercise 1 passes" in good.stdout, good.stdout + good.stderr
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "not written yet" in bad.stdout, bad.stdout + bad.stderr
