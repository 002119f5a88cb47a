"""The checks of the classroom exercises, one module per exercise.

    framework.py         the registry (@exercise), the Checker (check / close / show), the runner
    toy.py               the tiny TinyLlava, the toy batch and the training loop the checks use
    c01_shifted_loss.py  exercise 1's check and the helpers only it uses; likewise c02_ ... c11_

Importing an exercise's module registers its check in EXERCISES; this package imports them all.
"""

import sys

from .framework import EXERCISES, ROOT, load_function, run, run_one  # noqa: F401

sys.path.insert(0, ROOT)  # the checks import tinyllava.py and data.py from the repository root

from . import (  # noqa: E402, F401
    c01_shifted_loss,
    c02_conversation_labels,
    c03_image_splice,
    c04_freezing,
    c05_rope,
    c06_gqa_kv_cache,
    c07_pad_preprocess,
    c08_pooled_projector,
    c09_skip_stage1,
    c10_lora,
    c11_seeing_inside,
)
