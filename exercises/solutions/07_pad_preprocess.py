"""Solution to exercise 7: data.py's preprocess_image with mode="pad" is the reference."""

import data


def preprocess_pad(image, size, mean, std):
    return data.preprocess_image(image, size, mean, std, mode="pad")
