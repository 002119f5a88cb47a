"""Training: stage 0 -> 1 -> 2 on a small shapes set, through the same code as the offline pipeline.

Proves: the stand-ins are saved in HF formats and load through from_pretrained; each stage's loss
falls; frozen parameters stay bit-identical (vision + LLM in stage 1, vision in stage 2); stage 2
starts from stage 1's projector (loaded, not re-initialised); the held-out answers beat a guess that
ignores the image; the trained positions of a collated batch decode to exactly the answers; a killed
run resumed from its last checkpoint ends bit-identical to an uninterrupted one; 2 gloo processes
(torchrun) compute the same first gradient and losses as 1 process with the same global batch, go
through stage 2 on batches without an image, and make stage 0's data set and stand-ins once;
batched (left-padded) answers equal one-by-one answers; `chat.py chat --prompt` and `eval` work as
commands; a non-finite loss stops training, naming the step; batches grouped by length cover the
data once, in a resumable order, with little padding; --seed reaches stage 0 (same seed, same
stand-ins); held-out conversations are scored turn by turn after the model's own answers; the
stand-in's documents are made out of the cycle collector's sight, and are the same.

Run: python -m pytest -q tests/test_train.py
"""

import gc
import json
import os
import random
import re
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from functools import partial

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conftest import losses, pt_args, sft_args  # noqa: E402

import chat  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
import train_pt  # noqa: E402
from chat import evaluate  # noqa: E402
from offline import standins  # noqa: E402
from tinyllava import (  # noqa: E402
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    InputError,
    LanguageModel,
    TinyLlava,
    shifted_cross_entropy,
)


def free_port():
    """A TCP port no one listens on now, for a torchrun rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_standins_are_hf_checkpoints(pipeline):
    from tinyllava import VisionTower

    tower = VisionTower.from_pretrained(pipeline["vision"])  # select_layer=-2 of the 3 saved layers
    assert len(tower.encoder.layers) == standins.VISION.num_hidden_layers - 1
    assert tower.num_tokens == 9  # one patch per grid cell
    lm = LanguageModel.from_pretrained(pipeline["llm"])
    tok = data.load_tokenizer(pipeline["llm"])
    assert (tok.vocab_size <= lm.config.vocab_size
            and tok.token_to_id("<|im_end|>") in lm.config.eos_token_id)
    assert (tok.decode(tok.encode("a small red circle at the top left."))
            == "a small red circle at the top left.")


def test_each_stage_loss_falls(pipeline):
    for stage in ("pt", "sft"):
        log = losses(pipeline[stage])
        first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
        assert last < 0.9 * first, f"{stage}: loss {first:.3f} -> {last:.3f}"
        assert "eval_loss" in log[-1]
        with Image.open(os.path.join(pipeline[stage], "loss.png")) as im:  # stage 2 beside stage 1
            assert im.size == ((640 if stage == "pt" else 1280), 360)


def test_frozen_parameters_are_bit_identical(pipeline):
    vision = load_file(os.path.join(pipeline["vision"], "model.safetensors"))
    llm = load_file(os.path.join(pipeline["llm"], "model.safetensors"))

    def same(module, tensors, prefix=""):
        return all(torch.equal(p, tensors[prefix + n]) for n, p in module.named_parameters())

    pt = pipeline["pt_model"]  # stage 1 froze both
    assert same(pt.vision_tower, vision, "vision_model.") and same(pt.language_model, llm)
    sft = TinyLlava.from_pretrained(pipeline["sft"])  # stage 2 froze the vision tower only
    assert same(sft.vision_tower, vision, "vision_model.")
    assert not same(sft.language_model, llm)
    projector = load_file(os.path.join(pipeline["pt"], chat.PROJECTOR_FILE))
    assert not same(sft.multi_modal_projector, projector, "multi_modal_projector.")


def test_stage2_starts_from_the_stage1_projector(pipeline):
    projector = load_file(os.path.join(pipeline["pt"], chat.PROJECTOR_FILE))
    model = chat.load_stage1(pipeline["pt"])
    for n, p in model.multi_modal_projector.named_parameters():
        assert torch.equal(p, projector["multi_modal_projector." + n])
    torch.manual_seed(0)
    fresh = TinyLlava.from_parts(pipeline["vision"], pipeline["llm"])
    assert not torch.equal(fresh.multi_modal_projector.linear_1.weight,
                           model.multi_modal_projector.linear_1.weight)
    assert model.chat["image"]["size"] == standins.IMAGE_SIZE  # the image settings travel with it


def test_answers_beat_a_blind_guess(pipeline, tmp_path):
    """End to end, the model reads the image: on the held-out questions it beats, by 10 points, the
    best answer that ignores the image, the most frequent training answer to the same question."""
    tag = data.IMAGE_TAG + "\n"
    answers = {}
    for s in data.load_samples(os.path.join(pipeline["shapes"], "instruct.json")):
        turns = s["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            answers.setdefault(q["value"].removeprefix(tag), []).append(a["value"])
    test = data.load_samples(os.path.join(pipeline["shapes"], "test.json"))
    # held-out questions that the most frequent training answer gets right (ties: the first seen)
    blind = 0
    for s in test:
        seen = answers.get(s["conversations"][0]["value"].removeprefix(tag))
        if seen:
            blind += Counter(seen).most_common(1)[0][0] == s["conversations"][1]["value"]
    acc = evaluate(pipeline["sft"], os.path.join(pipeline["shapes"], "test.json"),
                   out=str(tmp_path / "answers.jsonl"))
    assert len(test) == 40 and acc["all"] >= blind / len(test) + 0.1, (acc, blind)


def test_batching_changes_no_answer(pipeline, tmp_path):
    """Left padding must not change any answer: the held-out questions in batches of 16 and one at a
    time."""
    test_file = os.path.join(pipeline["shapes"], "test.json")
    acc = evaluate(pipeline["sft"], test_file, batch_size=16, out=str(tmp_path / "a.jsonl"))
    assert set(acc) == {"all"} | {s["type"] for s in data.load_samples(test_file)}
    evaluate(pipeline["sft"], test_file, batch_size=1, out=str(tmp_path / "b.jsonl"))
    batched, single = (open(tmp_path / f).read().splitlines() for f in ("a.jsonl", "b.jsonl"))
    assert ([json.loads(r)["prediction"] for r in batched]
            == [json.loads(r)["prediction"] for r in single])


def test_trained_positions_of_a_collated_batch_are_the_answers(pipeline):
    tok = data.load_tokenizer(pipeline["llm"])
    path = os.path.join(pipeline["shapes"], "instruct.json")
    ds = data.ConversationDataset(path, tok, "chatml", standins.IMAGE)
    batch = partial(data.collate, pad_id=tok.pad_id)([ds[i] for i in range(12)])
    samples = {s["id"]: s for s in data.load_samples(path)}
    assert (batch["input_ids"].shape == batch["labels"].shape
            and (batch["attention_mask"] == 0).any())  # padding present
    for row, labels, sid in zip(batch["input_ids"], batch["labels"], batch["ids"]):
        trained = row[labels != IGNORE_INDEX].tolist()
        replies = [t["value"] for t in samples[sid]["conversations"] if t["from"] == "gpt"]
        expected = "".join(r + "<|im_end|>" for r in replies)
        assert tok.decode(trained) == expected
        # labels are the ids, unshifted
        assert torch.equal(labels[labels != IGNORE_INDEX], row[labels != IGNORE_INDEX])


def test_resume_after_kill_equals_uninterrupted_run(pipeline, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--epochs", "1", "--batch-size", "8", "--micro-batch-size", "8", "--eval-every", "4"]
    train_pt.main(pt_args(pipeline, a, *args))
    # "killed" after step 7
    train_pt.main(pt_args(pipeline, b, *args, "--save-every", "3", "--max-steps", "7"))
    # step 7 was lost
    assert torch.load(os.path.join(b, "checkpoint.pt"), weights_only=False)["step"] == 6
    train_pt.main(pt_args(pipeline, b, *args, "--save-every", "3", "--resume"))
    keys = ("step", "loss", "lr", "grad_norm", "eval_loss")
    assert ([{k: r.get(k) for k in keys} for r in losses(a)]
            == [{k: r.get(k) for k in keys} for r in losses(b)])
    pa, pb = (load_file(os.path.join(d, chat.PROJECTOR_FILE)) for d in (a, b))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_ddp_two_processes_match_one(pipeline, tmp_path):
    """2 gloo processes compute the step that 1 process computes: the same first gradient, then the
    same losses.

    The gradient is compared before AdamW sees it: AdamW divides each component by its own running
    magnitude, so a component near 0 turns a last-bit difference of summation order into a visible
    one in the weights. After step 1 AdamW's first moment is exactly (1 - beta1) times the
    gradient."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # 1 x (2 micro-batches) vs 2 x 4; no clipping, so the checkpoint holds the raw gradient
    args = ["--epochs", "1", "--batch-size", "8", "--micro-batch-size", "4", "--save-every", "1",
            "--grad-clip", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", free_port(), os.path.join(ROOT, "train_pt.py")]
    for steps in ("1", "4"):  # the second launch resumes both runs from step 1's checkpoint
        extra = ["--max-steps", steps] + (["--resume"] if steps == "4" else [])
        train_pt.main(pt_args(pipeline, one, *args, *extra))
        result = subprocess.run(cmd + pt_args(pipeline, two, *args, *extra), cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 process(es)" in result.stdout
        # every caption has an image: DDP is not asked to search for unused parameters (torch warns
        # when it finds none)
        assert "find_unused_parameters" not in result.stderr
        if steps == "1":
            files = [os.path.join(d, "checkpoint.pt") for d in (one, two)]
            moments = [torch.load(f, weights_only=False)["optimizer"]["state"] for f in files]
            for k, state in moments[0].items():
                g1, g2 = state["exp_avg"], moments[1][k]["exp_avg"]
                # the processes add the same per-sample gradients in another order (other
                # micro-batches, other padded shapes, then the all-reduce); a reordered fp32 sum
                # moves by a few units in the last place of its largest terms: 64 of them (2**-24
                # each) is the bound
                torch.testing.assert_close(g2, g1, rtol=0, atol=64 * 2**-24 * g1.abs().max().item())
    l1, l2 = [r["loss"] for r in losses(one)], [r["loss"] for r in losses(two)]
    assert len(l1) == len(l2) == 4 and l1 == pytest.approx(l2, rel=1e-5)


STAGE0_UNDER_TORCHRUN = """
import functools, sys
sys.path.insert(0, sys.argv[1])
import train
from offline import standins
train.init_distributed()
shapes_dir = train.first_process_first(lambda: standins.ensure_shapes(sys.argv[2], n_images=60))
standins.train_llm = functools.partial(standins.train_llm, n_docs=64)  # a few documents: fast
standins.ensure_standins(shapes_dir, out_dir=sys.argv[3], max_steps=2, batch_size=8, micro_batch_size=4,
                         progress=False)
"""


def test_stage0_under_torchrun_makes_everything_once(tmp_path):
    """torchrun with 2 processes on a fresh directory: the first process makes the data set while the
    other waits, both train each stand-in (DDP), process 0 writes it, and both go on only once it is
    on disk."""
    script = tmp_path / "stage0.py"
    script.write_text(STAGE0_UNDER_TORCHRUN)
    shapes_dir, out = tmp_path / "shapes", tmp_path / "standins"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           free_port(), str(script), ROOT, str(shapes_dir), str(out)]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("made the shapes data set") == 1
    assert result.stdout.count("2 process(es)") == 2  # the vision and the LLM stand-in
    assert result.stdout.count("stage 0: llm stand-in done") == 1  # printed by process 0 alone
    TinyLlava.from_parts(str(out / "vision"), str(out / "llm"))  # both complete checkpoints
    assert json.loads((out / "llm" / "reading.json").read_text())["seed"] == 0


LEAVES_THE_GROUP = """
import atexit, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
import train
# registered first, so it runs last: after what init_distributed registers
atexit.register(lambda: print("group still joined" if dist.is_initialized() else "group left", flush=True))
train.init_distributed()
train.barrier()
"""


def test_processes_leave_the_process_group_before_python_shuts_down(tmp_path):
    """Each process leaves the group at exit, while Python is whole: a gloo group left to the
    interpreter's shutdown can abort a process whose work is done (SIGABRT, torchrun fails)."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVES_THE_GROUP)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           free_port(), str(script), ROOT]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("group left") == 2, result.stdout


def test_ddp_stage2_on_batches_without_an_image(pipeline, tmp_path):
    """2 processes through stage 2 on text-only conversations: no batch gives the projector a gradient,
    which DDP must be told to expect (it would wait for those gradients and fail at the next step);
    the projector stays as stage 1 left it, the LLM trains."""
    text_only = [s for s in data.load_samples(os.path.join(pipeline["shapes"], "instruct.json"))
                 if "image" not in s][:16]
    data_file, out = tmp_path / "text.json", tmp_path / "sft"
    data_file.write_text(json.dumps(text_only))
    args = sft_args(pipeline, str(out), "--data", str(data_file), "--batch-size", "8",
                    "--micro-batch-size", "4", "--eval-frac", "0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", free_port(), os.path.join(ROOT, "train_sft.py")]
    result = subprocess.run(cmd + args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and len(losses(str(out))) == 2
    sft = TinyLlava.from_pretrained(str(out))
    projector = load_file(os.path.join(pipeline["pt"], chat.PROJECTOR_FILE))
    assert all(torch.equal(p, projector["multi_modal_projector." + n])
               for n, p in sft.multi_modal_projector.named_parameters())
    llm = load_file(os.path.join(pipeline["llm"], "model.safetensors"))
    assert not all(torch.equal(p, llm[n]) for n, p in sft.language_model.named_parameters())


def test_chat_and_eval_commands(pipeline, tmp_path):
    sample = data.load_samples(os.path.join(pipeline["shapes"], "test.json"))[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    chat = subprocess.run([sys.executable, "chat.py", "chat", "--model", pipeline["sft"],
                           "--device", "cpu",
                           "--image", os.path.join(pipeline["shapes"], sample["image"]),
                           "--prompt", "How many shapes are there?"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr[-3000:]
    reply = chat.stdout.split("assistant> ")[-1].strip()
    assert reply and "<|im_end|>" not in reply
    out = tmp_path / "answers.jsonl"
    ev = subprocess.run([sys.executable, "chat.py", "eval", "--model", pipeline["sft"],
                         "--device", "cpu", "--data", os.path.join(pipeline["shapes"], "test.json"),
                         "--batch-size", "16", "--out", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr[-3000:]
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 40 and {"id", "type", "answer", "prediction", "correct"} <= rows[0].keys()
    assert f"{sum(r['correct'] for r in rows)}/40" in ev.stdout


def test_length_grouped_batches_cover_the_data_once_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.choice((20, 40, 130, 150)) + rng.randint(0, 9) for _ in range(803)]
    plain, grouped = (train.epoch_batches(803, 8, epoch=0, seed=0, lengths=L)
                      for L in (None, lengths))
    for batches in (plain, grouped):
        flat = [i for b in batches for i in b]
        # the tail of 3 dropped
        assert len(batches) == 100 and {len(b) for b in batches} == {8} and len(set(flat)) == 800
    # a function of (seed, epoch): resumable
    assert grouped == train.epoch_batches(803, 8, epoch=0, seed=0, lengths=lengths)
    assert grouped != train.epoch_batches(803, 8, epoch=1, seed=0, lengths=lengths)

    def padding(batches):
        used = sum(lengths[i] for b in batches for i in b)
        return 1 - used / sum(8 * max(lengths[i] for i in b) for b in batches)

    assert padding(plain) > 0.3 and padding(grouped) < 0.05
    # the batches are shuffled, not served shortest first
    means = [sum(lengths[i] for i in b) / 8 for b in grouped]
    assert means != sorted(means) and max(means[:10]) > 100


def test_non_finite_loss_stops_training_naming_the_step(tmp_path):
    model = torch.nn.Linear(2, 1)
    samples = [dict(x=torch.ones(2)) for _ in range(8)]

    def nan_loss(m, batch):
        return m(batch["x"]).sum() * float("nan"), 1, 1

    cfg = train.TrainConfig(out_dir=str(tmp_path), batch_size=4, micro_batch_size=4, progress=False)
    with pytest.raises(FloatingPointError, match="step 1"):
        train.train(model, samples, standins.stack, nan_loss, cfg)


def test_soft_words_are_summed_and_never_trained(pipeline):
    """The stand-in LLM reads an image as 9 soft words (summed embeddings of the words naming each
    cell, a shape also in its plural)."""
    tok = data.load_tokenizer(pipeline["llm"])
    words = standins.attribute_words(tok)
    scene = standins.soft_scene([dict(shape="circle", color="red", size="large", cell=0)], words)
    assert len(scene) == 9
    # every form of a word that the text uses and that is one token: " circle", "circle", " circles"
    assert ({tok.decode([i]).strip() for i in scene[0]}
            == {"top", "left", "large", "red", "circle", "circles"})
    assert {tok.decode([i]).strip() for i in scene[4]} == {"center", "empty"}
    # several tokens: the first is trained as if it were a prompt, the rest as a reply
    text = tok.encode(" hello")
    assert len(text) > 1
    ids = [IMAGE_TOKEN_INDEX] + text
    doc = standins.soft_document(ids, [IGNORE_INDEX] * 2 + text[1:],
                                 [dict(shape="circle", color="red", size="large", cell=0)], words)
    assert [w for w, _ in doc] == scene + [[i] for i in text]
    batch = standins.pad_documents([doc, doc[9:10]])
    assert ((batch["labels"][0, :10] == IGNORE_INDEX).all()
            and batch["labels"][0, 10:].tolist() == text[1:])
    # the short document is padded
    assert batch["attention_mask"][1].tolist() == [1] + [0] * (8 + len(text))
    assert (batch["labels"][1] == IGNORE_INDEX).all()
    lm = LanguageModel.from_pretrained(pipeline["llm"])
    E = lm.model.embed_tokens.weight
    got = standins.soft_embed(lm, batch["words"][:1])[0]
    assert torch.allclose(got[0], E[scene[0]].sum(0)) and torch.equal(got[9], E[text[0]])
    # the loss applies lm_head to the trained positions only: it must equal the loss over all the
    # logits
    loss, n, _ = standins.lm_loss(lm, batch)
    logits = lm(inputs_embeds=standins.soft_embed(lm, batch["words"]),
                attention_mask=batch["attention_mask"])
    assert (n == len(text) - 1
            and torch.allclose(loss / n, shifted_cross_entropy(logits, batch["labels"])))


def test_documents_are_made_out_of_the_cycle_collectors_sight(pipeline):
    """frozen_gc: the collector is off while the documents are made, on again after, and what was made
    is frozen (later collections skip it); the documents are those made with the collector on."""
    tok = data.load_tokenizer(pipeline["llm"])
    plain = standins.lm_documents(pipeline["shapes"], tok, 20, seed=1)
    before = gc.get_freeze_count()
    with standins.frozen_gc():
        assert not gc.isenabled()
        docs = standins.lm_documents(pipeline["shapes"], tok, 20, seed=1)
    assert gc.isenabled() and docs == plain
    assert gc.get_freeze_count() >= before + sum(map(len, docs))  # a list per position at least


def test_stand_in_reads_a_batch_as_it_reads_each_prompt(pipeline):
    """read_scenes answers left-padded prompts of different lengths in one batch with a KV cache:
    the replies must be those of a greedy full recompute of each prompt alone (in float64, so that
    no near tie can flip an argmax)."""
    lm = LanguageModel.from_pretrained(pipeline["llm"]).double()
    tok = data.load_tokenizer(pipeline["llm"])
    words, ends = standins.attribute_words(tok), (tok.token_to_id("<|im_end|>"), tok.eos_id)
    meta = json.load(open(os.path.join(pipeline["shapes"], "meta.json")))["images"]
    questions = data.load_samples(os.path.join(pipeline["shapes"], "test.json"))[:6]
    objects = {m["image"]: m["objects"] for m in meta}
    prompts = []
    for s in questions:
        ids = data.build_prompt(s["conversations"][:-1], tok, "chatml")
        prompts.append(standins.soft_document(ids, [IGNORE_INDEX] * len(ids), objects[s["image"]], words))
    assert len({len(p) for p in prompts}) > 1  # the batch needs padding
    want = []
    for prompt in prompts:
        out = []
        while len(out) < 12:
            x = standins.pad_documents([prompt + [([i], i) for i in out]])["words"]
            nxt = lm(inputs_embeds=standins.soft_embed(lm, x))[0, -1].argmax().item()
            if nxt in ends:
                break
            out.append(nxt)
        want.append(tok.decode(out).strip())
    assert any(want) and standins.read_scenes(lm, tok, prompts, max_new_tokens=12) == want


def test_stage0_follows_the_seed(pipeline, tmp_path):
    """--seed reaches stage 0: the same seed trains the same stand-ins, another seed other ones, and a
    directory of one seed's stand-ins is not silently reused for another."""
    cpu = torch.device("cpu")

    def standins_of(seed, name):
        out = str(tmp_path / name)
        standins.train_vision(pipeline["shapes"], out, cpu, seed=seed, epochs=1, progress=False)
        standins.train_llm(pipeline["shapes"], out, cpu, n_docs=48, seed=seed, progress=False)
        return [load_file(os.path.join(out, part, "model.safetensors")) for part in ("vision", "llm")], out

    (a, out), (b, _), (c, _) = standins_of(0, "a"), standins_of(0, "b"), standins_of(1, "c")
    for x, y, z in zip(a, b, c):
        assert all(torch.equal(x[k], y[k]) for k in x)
        assert not all(torch.equal(x[k], z[k]) for k in x)
    with open(os.path.join(out, "llm", "reading.json")) as f:
        assert json.load(f)["seed"] == 0
    standins.ensure_standins(pipeline["shapes"], out_dir=out, seed=0)  # there already: nothing to train
    with pytest.raises(InputError, match="holds the stand-ins of seed 0, not 1"):
        standins.ensure_standins(pipeline["shapes"], out_dir=out, seed=1)


def test_conversations_are_scored_turn_by_turn_after_the_models_own_answers(pipeline, tmp_path):
    """The held-out conversations (test_chat.json): every turn is scored, typed, and asked after the
    model's own earlier answers; the same turns asked with that history written out give the same answers."""
    chats = data.load_samples(os.path.join(pipeline["shapes"], "test_chat.json"))[:6]
    for s in chats:  # references the model cannot produce: they must not leak into the next prompt
        s["conversations"][1]["value"] = "a purple hexagon somewhere."
    file = tmp_path / "chats.json"
    file.write_text(json.dumps(chats))
    acc = evaluate(pipeline["sft"], str(file), image_folder=pipeline["shapes"],
                   out=str(tmp_path / "answers.jsonl"), max_new_tokens=64)
    rows = [json.loads(line) for line in open(tmp_path / "answers.jsonl")]
    assert len(rows) == sum(len(s["types"]) for s in chats)
    assert [(r["id"], r["turn"], r["type"]) for r in rows] == [
        (s["id"], k + 1, t) for s in chats for k, t in enumerate(s["types"])]
    assert acc["turn 1"] == 0 and {"all", "describe", "turn 2"} <= acc.keys()
    # the second turns again, their prompts written out by hand with the model's first answer as history
    model, tok, settings = chat.load_for_inference(pipeline["sft"])
    first = {r["id"]: r["prediction"] for r in rows if r["turn"] == 1}
    prompts = []
    for s in chats:
        turns = [s["conversations"][0], {"from": "gpt", "value": first[s["id"]]}, s["conversations"][2]]
        prompts.append(data.build_prompt(data.with_image_tag(turns), tok, settings.template))
    pixels = torch.stack([data.load_image(os.path.join(pipeline["shapes"], s["image"]), settings.image)
                          for s in chats])
    stop = chat.stop_ids(model, tok, settings.template)
    again = chat.answer_batch(model, tok, prompts, pixels, stop=stop, max_new_tokens=64)
    assert again == [r["prediction"] for r in rows if r["turn"] == 2]


class Squares(torch.utils.data.Dataset):
    """x -> x**2 samples for a linear model; sample `bad` is broken, as an unreadable image would be."""

    def __init__(self, n, bad=None):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.bad:
            raise data.DataError(f"squares.json: sample {i}: cannot read image {i}.png")
        x = torch.tensor([i / self.n, 1.0])
        return dict(x=x, y=x[:1] ** 2)


def squares_loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).sum(), len(batch["x"]), len(batch["x"])


@pytest.mark.parametrize("resume", [False, True])
def test_worker_processes_load_what_the_loop_would(tmp_path, resume):
    """DataLoader workers change no number: 2 workers train the weights and log the losses that in-process
    loading gives (with 2 micro-batches per step and an eval set), also across a resume."""
    runs = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        cfg = train.TrainConfig(out_dir=str(tmp_path / str(workers)), batch_size=8, micro_batch_size=4,
                                epochs=3, progress=False, num_workers=workers, eval_every=2, save_every=2)
        if resume:  # killed after step 3 (its checkpoint is step 2's), then resumed
            train.train(model, Squares(40), standins.stack, squares_loss, replace(cfg, max_steps=3),
                        eval_set=Squares(12))
        log = train.train(model, Squares(40), standins.stack, squares_loss,
                          replace(cfg, resume=resume), eval_set=Squares(12))
        logged = [(r["loss"], r["grad_norm"], r.get("eval_loss")) for r in log]
        runs[workers] = logged, model.weight.detach().clone()
    assert runs[0][0] == runs[2][0] and len(runs[0][0]) == 15 and torch.equal(runs[0][1], runs[2][1])


def test_bad_sample_in_a_worker_is_one_line_naming_it(tmp_path):
    cfg = train.TrainConfig(out_dir=str(tmp_path), batch_size=4, micro_batch_size=4, progress=False,
                            num_workers=1)
    with pytest.raises(data.DataError) as e:
        train.train(torch.nn.Linear(2, 1), Squares(16, bad=5), standins.stack, squares_loss, cfg)
    assert str(e.value) == "squares.json: sample 5: cannot read image 5.png"


def test_two_nodes_on_one_machine_match_one_process(pipeline, tmp_path):
    """The multi-node launch the README documents: two torchrun launchers, one per "node" (both on this
    machine, a static rendezvous on 127.0.0.1), one process each, train the steps that 1 process trains."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--epochs", "1", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2"]
    train_pt.main(pt_args(pipeline, one, *args))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]  # files, not pipes: a full pipe blocks a node
    launchers, port = [], free_port()
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as f:
                launchers.append(subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                     "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                     os.path.join(ROOT, "train_pt.py"), *pt_args(pipeline, two, *args)],
                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=300) for p in launchers]
    finally:  # a failed or hung launch leaves no process behind
        for p in launchers:
            p.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 process(es)" in outputs[0]
    l1, l2 = [r["loss"] for r in losses(one)], [r["loss"] for r in losses(two)]
    assert len(l1) == len(l2) == 2 and l1 == pytest.approx(l2, rel=1e-5)


HI, ONE, TWO = {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "1"}, {"from": "gpt", "value": "2"}


@pytest.mark.parametrize("sample,message", [
    ({"id": "t1", "conversations": [{"from": "human", "value": "<image>\nHi?"}, ONE]},
     "sample t1: 1 <image> tag(s) but 0 image(s)"),
    ({"id": "t2", "types": ["count"], "conversations": [HI, ONE, HI, TWO]},
     "sample t2: 1 types for 2 questions"),
    ({"id": "t3", "conversations": [HI]}, "sample t3: the turns must alternate"),
])
def test_a_bad_evaluation_sample_is_named_before_anything_is_generated(pipeline, tmp_path, sample, message):
    file = tmp_path / "bad.json"
    file.write_text(json.dumps([sample]))
    with pytest.raises(data.DataError, match=re.escape(message)):
        evaluate(pipeline["sft"], str(file), out=str(tmp_path / "answers.jsonl"))
