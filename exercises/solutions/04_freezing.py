"""Solution to exercise 4: the two stages' freezing policies."""


def set_stage(model, stage):
    trainable = {"pretrain": ("multi_modal_projector",),  # stage 1: align the projector only
                 "finetune": ("multi_modal_projector", "language_model")}  # stage 2: the vision tower stays frozen
    if stage not in trainable:
        raise ValueError(f"unknown stage {stage!r}; use 'pretrain' or 'finetune'")
    for name in ("vision_tower", "multi_modal_projector", "language_model"):
        # requires_grad_ (with the underscore) sets the flag on every parameter of the part;
        # `part.requires_grad = False` would only add an unused attribute to the module
        getattr(model, name).requires_grad_(name in trainable[stage])
