"""Exercise 11: seeing inside, the image tokens as words (cosine nearest neighbours)."""

import torch
import torch.nn.functional as F

import explain

from .framework import describe, diagnose, exercise, gen, patched
from .toy import tiny_model

NOT_COSINE = ("rank by cosine: normalise BOTH the vectors and the vocabulary rows to unit length "
              "(F.normalize(x, dim=-1)) before the product; a raw dot product favours long rows")


class Words:
    """A stand-in tokenizer for explain.patch_words: token i reads as 'w<i>'."""
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def decode(self, ids):
        return f"w{ids[0]}"


@exercise(11, "11_seeing_inside", "nearest", "seeing inside: the image tokens as words")
def check_nearest(fn, c):
    tokens = torch.randn(2, 6, 16, generator=gen(0))  # (n_img, N, D)
    vocab = torch.randn(40, 16, generator=gen(1))
    vocab[7] *= 10  # one long row: a dot product would find it nearest to almost everything
    out = fn(tokens, vocab, 3)
    c.check("returns (cosines, ids)", isinstance(out, tuple) and len(out) == 2
            and all(torch.is_tensor(t) for t in out), expected="a pair of tensors", got=describe(out),
            hint="torch.topk returns exactly such a pair: values, indices")
    want = explain.nearest(tokens, vocab, 3)
    cos, ids = out
    c.check("shapes (n_img, N, k) for tokens (n_img, N, D)", cos.shape == ids.shape == want.indices.shape,
            expected=tuple(want.indices.shape), got=f"{tuple(cos.shape)} and {tuple(ids.shape)}",
            hint="take the top k over the LAST dimension, the vocabulary")
    dot = (tokens @ vocab.T).topk(3, dim=-1)
    euclid = (-torch.cdist(tokens, vocab.expand(2, -1, -1))).topk(3, dim=-1)
    c.check("the ids of the nearest rows by cosine, nearest first", torch.equal(ids.long(), want.indices),
            expected=want.indices[0, 0].tolist(), got=ids[0, 0].tolist(),
            hint=diagnose(ids.float(), [(dot.indices.float(), NOT_COSINE),
                                        (euclid.indices.float(), "cosine, not euclidean distance: the LLM's "
                                         "RMSNorm divides the length out, so the direction counts")],
                          default=NOT_COSINE))
    c.close("their cosine similarities", cos, want.values,
            hint="return the cosines themselves (between -1 and 1), not distances or dot products")
    # a vector that is the sum of three words' embeddings, as the offline LLM's soft words are
    vocab = F.normalize(torch.randn(60, 64, generator=gen(2)), dim=-1)
    bags = torch.stack([vocab[[3, 17, 42]].sum(0), vocab[[5, 6, 7]].sum(0)])
    _, ids = fn(bags, vocab, 3)
    c.check("a sum of three word embeddings has those three words nearest",
            [sorted(r) for r in ids.tolist()] == [[3, 17, 42], [5, 6, 7]],
            expected="[[3, 17, 42], [5, 6, 7]] (in any order)", got=ids.tolist())
    # plugged into explain.py: the words of a tiny model's patches
    model = tiny_model()
    pixels = torch.randn(1, 3, 16, 16, generator=gen(3))
    tokenizer = Words(model.language_model.config.vocab_size)
    expected = explain.patch_words(model, tokenizer, pixels, k=3)
    with patched(explain, "nearest", fn):
        got = explain.patch_words(model, tokenizer, pixels, k=3)
    c.check("in explain.py: every patch of a tiny TinyLlava gets the same words as with the reference",
            [[w for w, _ in p] for p in got[0]] == [[w for w, _ in p] for p in expected[0]],
            expected=[w for w, _ in expected[0][0]], got=[w for w, _ in got[0][0]])
    c.show("patch 0's words: " + ", ".join(f"{w} ({s:.2f})" for w, s in got[0][0]))
