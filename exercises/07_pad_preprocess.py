"""Exercise 7: LLaVA-1.5 'pad' preprocessing and normalisation. Task: exercises/07_pad_preprocess.md
Check: python exercises/check.py 7"""

import os
import sys

import numpy as np  # noqa: F401
import torch  # noqa: F401
from PIL import Image  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import to_rgb  # noqa: E402  (given: any PIL mode -> RGB)


def preprocess_pad(image, size, mean, std):
    """image: a PIL image of any size and mode; size: the encoder's input side in pixels; mean,
    std: three floats each, the encoder's per-channel pixel statistics in [0, 1].

    Return a float32 tensor (3, size, size): the image padded to a centred square with the mean
    colour, resized to size x size (bicubic), scaled to [0, 1] and normalised with mean and std."""
    image = to_rgb(image)
    raise NotImplementedError
