"""Every command line answers a user's mistake with one line, `error: <what, naming the file / key>`, and a
non-zero exit code, never a Python traceback: bad data, a missing file or checkpoint, a checkpoint of the
wrong kind, an unknown template, a bad flag value.

Run: python -m pytest -q tests/test_cli.py
"""

import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = "/nonexistent/tinyllava-test"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "broken.json").write_text('[{"id": "a1", "conversations": [}]')
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"])
    tok.train_from_iterator(["a small red circle"], trainer)
    (d / "tok").mkdir()
    tok.save(str(d / "tok" / "tokenizer.json"))
    (d / "bert").mkdir()
    (d / "bert" / "config.json").write_text('{"model_type": "bert"}')
    (d / "llava").mkdir()
    (d / "llava" / "config.json").write_text('{"model_type": "llava"}')
    return d


CASES = {
    "data show: malformed JSON": (["data.py", "show", "{d}/broken.json", "--tokenizer", "{d}/tok"],
                                  "broken.json: malformed JSON at line 1"),
    "data show: missing file": (["data.py", "show", "{d}/absent.json", "--tokenizer", "{d}/tok"],
                                "absent.json"),
    "data show: no tokenizer": (["data.py", "show", "{d}/broken.json", "--tokenizer", MISSING],
                                f"no tokenizer.json in '{MISSING}'"),
    "train_pt: missing vision checkpoint": (
        ["train_pt.py", "--vision", MISSING, "--llm", MISSING, "--data", "{d}/broken.json"],
        f"no config.json in '{MISSING}'"),
    "train_sft: unknown template": (["train_sft.py", "--data", "{d}/broken.json", "--template", "vicuna"],
                                    "unknown template 'vicuna'"),
    "train_sft: missing stage-1 output": (["train_sft.py", "--pt", MISSING, "--data", "{d}/broken.json",
                                           "--template", "chatml"], f"no config.json in '{MISSING}'"),
    "chat eval: missing model": (["chat.py", "eval", "--model", MISSING, "--data", "{d}/broken.json"],
                                 f"no config.json in '{MISSING}'"),
    "chat eval: not a LLaVA checkpoint": (
        ["chat.py", "eval", "--model", "{d}/bert", "--data", "{d}/broken.json"],
        "config.json: model_type 'bert' is not 'llava'"),
    "chat eval: LLaVA config without its parts": (
        ["chat.py", "eval", "--model", "{d}/llava", "--data", "{d}/broken.json"],
        "a LLaVA config needs a vision_config and a text_config"),
    "chat: missing model": (["chat.py", "chat", "--model", MISSING, "--prompt", "hi"], MISSING),
    "offline.shapes: bad flag value": (["-m", "offline.shapes", "{d}/shapes", "--n-images", "many"],
                                       "invalid int value: 'many'"),
}


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line(files, case):
    args, message = CASES[case]
    cmd = [sys.executable] + [a.format(d=files) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "error: " in last and message in last, result.stderr
