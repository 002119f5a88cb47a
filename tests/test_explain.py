"""explain.py on the small pipeline: the pictures are written at their sizes, the answer it explains is
chat's greedy answer, its attention rows are distributions, and stage 1's image tokens lie nearer the
words naming their cells than a random projector's do (and `share` says how long they are).

Run: python -m pytest -q tests/test_explain.py
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import chat  # noqa: E402
import data  # noqa: E402
import explain  # noqa: E402


def held_out_image(pipeline):
    with open(os.path.join(pipeline["shapes"], "meta.json")) as f:
        m = next(m for m in json.load(f)["images"] if m["split"] == "test" and len(m["objects"]) >= 2)
    return os.path.join(pipeline["shapes"], m["image"]), m["objects"]


def test_pictures_and_the_answer_they_explain(pipeline, tmp_path):
    image, objects = held_out_image(pipeline)
    o = objects[0]
    prompts = [f"Where is the {o['color']} {o['shape']}?", "How many shapes are there?"]
    answers = explain.explain_image(pipeline["sft"], image, prompts, out_dir=str(tmp_path), k=3)
    n_layers = pipeline["sft_model"].language_model.config.num_hidden_layers
    with Image.open(tmp_path / "words.png") as im:
        assert im.size == (720, 720)  # 3x3 patches of 240 px
    for n, a in enumerate(answers, 1):
        assert a.layers == list(range(n_layers)) and len(a.image) == 9
        assert a.attention.shape[:2] == (n_layers, len(a.tokens))
        assert torch.allclose(a.attention.sum(-1), torch.ones(a.attention.shape[:2]), atol=1e-5)
        assert all(0 < p <= 1 for p in a.probs) and all(len(alts) == 3 for alts in a.alternatives)
        assert all(p >= q for p, alts in zip(a.probs, a.alternatives) for _, q in alts)  # greedy: the top one
        with Image.open(tmp_path / f"answer_{n}.png") as im:
            assert im.size == (200 + (n_layers + 1) * (144 + 8), 24 + len(a.tokens) * (144 + 18 + 8))
    # the explained answer is the one chat gives
    for a, q in zip(answers, prompts):
        said = chat.chat(pipeline["sft"], image_file=image, prompt=q, max_new_tokens=16)[-1]["value"]
        assert a.text == said


def test_stage1_words_beat_a_random_projector(pipeline):
    model, tokenizer, _ = chat.load_for_inference(pipeline["pt"])
    trained = explain.word_share(model, tokenizer, pipeline["shapes"], "test", k=3)
    with explain.random_projector(model):
        random = explain.word_share(model, tokenizer, pipeline["shapes"], "test", k=3)
    assert trained["cells"] == random["cells"] == 9 * 40
    # The small pipeline's projector learns to name either the objects' colours or the empty cells,
    # which of the two depending on the CPU's summation order: it names one far more often than a
    # random projector does, and the other never less often. Shape is not compared: a random
    # projector's tokens all sit near a few words, and when one of them is a shape word it names that
    # shape by chance in every cell that holds it
    gain = [trained[a] - random[a] for a in ("color", "empty")]
    assert max(gain) >= 0.2 and min(gain) >= 0, (trained, random)
    # the projector was put back
    again = explain.word_share(model, tokenizer, pipeline["shapes"], "test", k=3)
    assert again == trained
    # the tokens' length in words, from every patch of the 40 test images
    with open(os.path.join(pipeline["shapes"], "meta.json")) as f:
        files = [m["image"] for m in json.load(f)["images"] if m["split"] == "test"]
    settings = data.ChatConfig.from_dict(model.chat).image
    pixels = torch.stack([data.load_image(os.path.join(pipeline["shapes"], f), settings) for f in files])
    with torch.no_grad():
        tokens = model.encode_images(pixels)  # (40, 9, D)
    words = model.language_model.model.embed_tokens.weight[:tokenizer.vocab_size]
    # two float32 means (of 360 lengths and of the words'), each within n * 2**-24 of another order's sum
    length = tokens.norm(dim=-1).mean() / words.norm(dim=-1).mean()
    assert trained["length"] == pytest.approx(length.item(), rel=1e-4)


def test_sinks_are_patches_that_draw_attention_under_every_question():
    def answer(focus):  # an Answer whose one token puts `focus` of its attention on 4 image patches
        attention = torch.tensor([[[0.5] + [f / 2 for f in focus]]])  # (1 layer, 1 token, S = 1 + 4)
        return explain.Answer(question="", text="a", tokens=["a"], probs=[1.0], alternatives=[[]],
                              layers=[0], attention=attention, image=range(1, 5))
    a, b = answer([0.7, 0.1, 0.1, 0.1]), answer([0.55, 0.0, 0.45, 0.0])
    assert a.on_image.item() == 0.5
    # over 1.5 x 1/4: patch 0 under both questions, patch 2 under one only
    assert explain.attention_sinks([a, b], factor=1.5) == [0]
    assert explain.attention_sinks([a]) == []


def test_user_errors_are_one_line(pipeline, tmp_path):
    cases = [(["image", "--model", pipeline["sft"], "--image", str(tmp_path / "none.png"), "--prompt", "hi"],
              "no image file"),
             (["image", "--model", str(tmp_path / "nomodel"), "--image", held_out_image(pipeline)[0],
               "--prompt", "hi"], "no config.json"),
             (["image", "--model", pipeline["sft"], "--image", held_out_image(pipeline)[0]], "--prompt"),
             (["share", "--model", pipeline["pt"], "--data", str(tmp_path)], "meta.json")]
    for args, message in cases:
        r = subprocess.run([sys.executable, "explain.py", *args], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, r.stderr
