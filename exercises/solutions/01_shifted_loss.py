"""Solution to exercise 1: tinyllava's own loss is the reference (read it in tinyllava.py)."""

import tinyllava as tl


def shifted_cross_entropy(logits, labels):
    # logits[:, t] predicts labels[:, t + 1]; positions labelled -100 are context, not targets;
    # the sum is divided by the number of trained tokens (at least 1, so an all-masked batch
    # gives 0)
    return tl.shifted_cross_entropy(logits, labels)
