"""Exercise 4: the freezing policy of stage 1 and stage 2."""

import contextlib
import io

import torch

import tinyllava as tl

from .framework import describe, exercise
from .toy import tiny_model, toy_batch, train

PARTS = ("vision_tower", "multi_modal_projector", "language_model")
POLICY = {"pretrain": {"multi_modal_projector"},
          "finetune": {"multi_modal_projector", "language_model"}}
# the same policy in the part names that train_pt.freeze takes
PIPELINE_POLICY = {"pretrain": ["projector"], "finetune": ["projector", "llm"]}


@exercise(4, "04_freezing", "set_stage", "the freezing policy of stage 1 and stage 2")
def check_freezing(fn, c):
    try:
        from train_pt import freeze as pipeline_freeze
    except ImportError:
        pipeline_freeze = None
    model = tiny_model()
    for stage in ("pretrain", "finetune", "pretrain"):
        fn(model, stage)
        for part in PARTS:
            flags = {p.requires_grad for p in getattr(model, part).parameters()}
            want = part in POLICY[stage]
            hint = None
            if getattr(getattr(model, part), "requires_grad", None) is False and flags != {False}:
                hint = (f"`model.{part}.requires_grad = False` only adds an attribute to the "
                        "module; use .requires_grad_(False), which sets every parameter")
            elif len(flags) > 1:
                hint = ("some parameters of this part are trainable and some are not: set every "
                        "parameter of the part")
            c.check(f"[{stage}] {part}: {'trainable' if want else 'frozen'}", flags == {want},
                    expected=f"requires_grad={want} on every parameter",
                    got=f"requires_grad values {sorted(flags)}", hint=hint)
        if pipeline_freeze is not None:  # the training pipeline's own policy, when it is there
            ref = tiny_model()
            with contextlib.redirect_stdout(io.StringIO()):
                pipeline_freeze(ref, PIPELINE_POLICY[stage])
            want = {n: p.requires_grad for n, p in ref.named_parameters()}
            c.check(f"[{stage}] the same trainable parameters as the training pipeline's "
                    "train_pt.freeze",
                    want == {n: p.requires_grad for n, p in model.named_parameters()})
        table = tl.parameter_table(model)
        print("        the parameter table (tinyllava.parameter_table):")
        c.show(table)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, toy_batch(), steps=1, lr=1e-2)
        for part in PARTS:
            changed = [n for n, p in getattr(model, part).named_parameters()
                       if not torch.equal(p, before[f"{part}.{n}"])]
            if part in POLICY[stage]:
                c.check(f"[{stage}] one AdamW step changes the {part}", len(changed) > 0,
                        expected="some weights changed", got="none changed")
            else:
                c.check(f"[{stage}] one AdamW step (weight decay 0.1) leaves the {part} "
                        "bit-identical", not changed, expected="every weight equal, bit for bit",
                        got=f"{len(changed)} tensors changed, e.g. {changed[:2]}")
    try:
        fn(model, "stage3")
        raised = None
    except Exception as e:
        raised = e
    c.check("an unknown stage name raises ValueError", isinstance(raised, ValueError),
            expected="ValueError", got=describe(raised) if raised else "no error",
            hint="a typo in a stage name must not silently train the wrong parts")
