"""Solution to exercise 4: the two stages' freezing policies."""


def set_stage(model, stage):
    # stage 1 aligns the projector only; stage 2 trains the LLM too; the vision tower stays frozen
    trainable = {"pretrain": ("multi_modal_projector",),
                 "finetune": ("multi_modal_projector", "language_model")}
    if stage not in trainable:
        raise ValueError(f"unknown stage {stage!r}; use 'pretrain' or 'finetune'")
    for name in ("vision_tower", "multi_modal_projector", "language_model"):
        # requires_grad_ (with the underscore) sets the flag on every parameter of the part;
        # `part.requires_grad = False` would only add an unused attribute to the module
        getattr(model, name).requires_grad_(name in trainable[stage])
