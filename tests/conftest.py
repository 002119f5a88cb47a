"""What several test files share: the small offline pipeline (stage 0, 1 and 2 on 400 shapes images),
built once per session."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_pt  # noqa: E402
import train_sft  # noqa: E402
from offline import shapes, standins  # noqa: E402

torch.set_num_threads(1)  # predictable on a shared 2-core CI machine, whichever test file runs first
QUIET = ["--no-progress"]


def pt_args(p, out_dir, *extra):
    return ["--vision", p["vision"], "--llm", p["llm"],
            "--data", os.path.join(p["shapes"], "captions.json"), "--out-dir", out_dir,
            "--lr", "3e-3", "--batch-size", "16", "--micro-batch-size", "16",
            "--cache-dir", os.path.join(p["root"], "cache"), *QUIET, *extra]


def sft_args(p, out_dir, *extra):
    return ["--pt", p["pt"], "--data", os.path.join(p["shapes"], "instruct.json"), "--template", "chatml",
            "--out-dir", out_dir, "--lr", "3e-3", "--epochs", "1", "--batch-size", "16",
            "--micro-batch-size", "16", "--cache-dir", os.path.join(p["root"], "cache"), *QUIET, *extra]


def losses(out_dir):
    """The rows of a run's metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """Stage 0 (stand-ins), stage 1 and stage 2 on 400 shapes images: small (about a minute), but
    every real code path, and enough training that the answers beat a blind guess (the LLM stand-in
    gets 1,000 steps)."""
    root = str(tmp_path_factory.mktemp("pipeline"))
    shapes_dir = os.path.join(root, "shapes")
    shapes.make_shapes(shapes_dir, n_images=400, size=standins.IMAGE_SIZE)
    cpu = torch.device("cpu")
    vision, _ = standins.train_vision(shapes_dir, root, cpu, epochs=20, batch_size=32,
                                      micro_batch_size=32, progress=False)
    llm = standins.train_llm(shapes_dir, root, cpu, n_docs=8000, batch_size=8, micro_batch_size=8,
                             progress=False)
    p = dict(root=root, shapes=shapes_dir, vision=vision, llm=llm, pt=os.path.join(root, "pt"),
             sft=os.path.join(root, "sft"))
    p["pt_model"] = train_pt.main(pt_args(p, p["pt"], "--epochs", "6", "--lr", "1e-2"))
    p["sft_model"] = train_sft.main(sft_args(p, p["sft"], "--epochs", "2", "--lr", "1e-3"))
    return p
