"""Exercise 4: the freezing policy of stage 1 and stage 2. Task: exercises/04_freezing.md
Check: python exercises/check.py 4"""


def set_stage(model, stage):
    """model: a TinyLlava with parts model.vision_tower, model.multi_modal_projector,
    model.language_model.
    stage: "pretrain" (stage 1) or "finetune" (stage 2); anything else raises ValueError.

    Set requires_grad on every parameter so that exactly the parts the stage trains are
    trainable."""
    raise NotImplementedError
