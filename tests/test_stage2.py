"""Stage 2 the way users run it on small GPUs, on the small pipeline (tests/conftest.py).

Proves: with --lora-r only the adapters and the projector train (the checkpoint holds nothing else), the
LLM's weights stay bit-identical, the saved model is the base plus exactly scale * B @ A (the adapters
are also saved alone), it loads in tinyllava and in transformers with equal logits, and a killed LoRA
run resumes bit-identically; --projector-lr and --vision-lr reach the optimizer's groups; --train-vision
trains the vision tower (the default run leaves it bit-identical, tests/test_train.py).

Run: python -m pytest -q tests/test_stage2.py
"""

import json
import os
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conftest import losses, sft_args  # noqa: E402

import chat  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
import train_sft  # noqa: E402
from tinyllava import IMAGE_TOKEN_INDEX, TinyLlava  # noqa: E402


def test_lora_trains_adapters_only_and_saves_a_merged_model(pipeline, tmp_path, capsys):
    out = str(tmp_path / "lora")
    targets = ["--lora-targets", "q_proj", "v_proj", "down_proj"]
    train_sft.main(sft_args(pipeline, out, "--lora-r", "4", *targets))
    assert "of which LoRA" in capsys.readouterr().out  # the parameter table shows the adapters
    trained = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]
    assert trained and all(".lora_" in k or k.startswith("multi_modal_projector.") for k in trained)
    adapters = load_file(os.path.join(out, train_sft.ADAPTERS_FILE))
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["r"] == 4 and config["alpha"] == 8 and len(adapters) == 2 * 3 * 2  # A, B x 3 x 2 layers
    base = load_file(os.path.join(pipeline["llm"], "model.safetensors"))
    merged = load_file(os.path.join(out, "model.safetensors"))
    scale = config["alpha"] / config["r"]
    for name, w in base.items():  # the stand-in's keys (its lm_head is tied: not saved)
        saved = merged["language_model." + name]
        module = name.removesuffix(".weight")
        if f"{module}.lora_A" in adapters:  # exactly base + scale * B @ A: the base was not touched
            A, B = adapters[f"{module}.lora_A"], adapters[f"{module}.lora_B"]
            assert torch.equal(saved, w.float() + B.float() @ A.float() * scale), name
            assert not torch.equal(saved, w), name
        else:
            assert torch.equal(saved, w), name
    # it learned: its held-out loss is below the start's on the same held-out conversations (the same
    # command at lr 0, one step, changes nothing); a first training batch's loss is no yardstick:
    # the batches' losses differ several-fold
    start = str(tmp_path / "start")
    train_sft.main(sft_args(pipeline, start, "--lora-r", "4", *targets, "--lr", "0", "--max-steps", "1",
                            "--eval-every", "1"))
    assert losses(out)[-1]["eval_loss"] < losses(start)[-1]["eval_loss"]
    # an ordinary checkpoint: tinyllava and transformers read it and agree
    transformers = pytest.importorskip("transformers")
    ours = TinyLlava.from_pretrained(out).eval()
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert (ours(ids)[0] - ref(input_ids=ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_transformers_runs_the_checkpoint_as_chat_does(pipeline, tmp_path, variant):
    """AutoProcessor + LlavaForConditionalGeneration on the saved directory alone: the prompt's ids are
    tinyllava's with the image token repeated once per image token, and the greedy answers are chat's."""
    transformers = pytest.importorskip("transformers")
    out = pipeline["sft"]
    if variant == "lora":
        out = str(tmp_path / "lora")
        train_sft.main(sft_args(pipeline, out, "--lora-r", "4", "--max-steps", "6"))
    processor = transformers.AutoProcessor.from_pretrained(out)
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    model, tokenizer, settings = chat.load_for_inference(out)
    image_id = processor.tokenizer.convert_tokens_to_ids(data.IMAGE_TAG)
    samples = data.load_samples(os.path.join(pipeline["shapes"], "test.json"))[:4]
    for s in samples:
        question = s["conversations"][0]["value"].replace(data.IMAGE_TAG, "").strip()
        image = os.path.join(pipeline["shapes"], s["image"])
        content = [{"type": "image"}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        with Image.open(image) as im:
            inputs = processor(images=im, text=text, return_tensors="pt")
        ids = data.build_prompt([{"from": "human", "value": data.image_first(question)}], tokenizer,
                                settings.template)
        at = ids.index(IMAGE_TOKEN_INDEX)
        expanded = ids[:at] + [image_id] * model.vision_tower.num_tokens + ids[at + 1:]
        assert inputs["input_ids"][0].tolist() == expanded
        with torch.no_grad():
            new = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
        new = new[0, inputs["input_ids"].size(1):]
        said = chat.chat(out, image_file=image, prompt=question, max_new_tokens=8)[-1]["value"]
        assert processor.tokenizer.decode(new, skip_special_tokens=True).strip() == said


def test_lora_run_resumes_bit_identically(pipeline, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--lora-r", "4", "--eval-every", "4", "--batch-size", "8", "--micro-batch-size", "8"]
    train_sft.main(sft_args(pipeline, a, *args))
    train_sft.main(sft_args(pipeline, b, *args, "--save-every", "3", "--max-steps", "7"))  # "killed"
    train_sft.main(sft_args(pipeline, b, *args, "--save-every", "3", "--resume"))
    keys = ("step", "loss", "lr", "grad_norm", "eval_loss")
    rows = [[{k: r.get(k) for k in keys} for r in losses(d)] for d in (a, b)]
    assert rows[0] == rows[1]
    wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_part_lrs_and_an_unfrozen_vision_tower(pipeline, tmp_path, capsys):
    out = str(tmp_path / "vision")
    model = train_sft.main(sft_args(pipeline, out, "--train-vision", "--vision-lr", "1e-4",
                                    "--projector-lr", "5e-4", "--max-steps", "2", "--save-every", "1"))
    table = capsys.readouterr().out
    vision_row = next(line for line in table.splitlines() if line.startswith("vision "))
    n = sum(p.numel() for p in model.vision_tower.parameters())
    assert vision_row.split()[1:] == [f"{n:,}", f"{n:,}"]  # the freezing table says it trains
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    groups, total = ckpt["optimizer"]["param_groups"], ckpt["run"]["total"]
    cfg = train.TrainConfig(lr=3e-3, warmup=train_sft.RECIPE["warmup"])
    for g in groups:  # the last step (index 1) ran every part on the schedule, at its own peak
        assert g["lr"] == train.lr_at(1, total, cfg, g["peak_lr"])
    tensors_at = {}  # peak lr -> how many parameter tensors train at it
    for g in groups:
        tensors_at[g["peak_lr"]] = tensors_at.get(g["peak_lr"], 0) + len(g["params"])
    parts = {"vision_tower.": 1e-4, "multi_modal_projector.": 5e-4, "language_model.": 3e-3}
    assert tensors_at == {lr: sum(n.startswith(prefix) for n, _ in model.named_parameters())
                          for prefix, lr in parts.items()}
    vision = load_file(os.path.join(pipeline["vision"], "model.safetensors"))
    saved = load_file(os.path.join(out, "model.safetensors"))
    changed = [k for k, w in vision.items() if "vision_model.encoder.layers.1." in k
               and not torch.equal(saved["vision_tower." + k.removeprefix("vision_model.")], w)]
    assert changed  # the tower's selected layer moved
