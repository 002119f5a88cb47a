"""tools/sweep.py --score: the table of runs already made, per question type and per turn, with the
minimum and the median over the seeds, and one clear error for a seed that has not run; --jobs: seeds
run at once.

Run: python -m pytest -q tests/test_sweep.py
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinyllava import InputError  # noqa: E402
from tools import sweep  # noqa: E402


def fake_run(out_dir, seed, reading, describe, answers, turns, seconds, val=None):
    """The files a finished seed leaves: stage 1's config naming the stand-in LLM, its reading.json,
    stage 2's answer files and the wall time; val: (reading, describe, answers, turns) of the
    validation split, which a --split val sweep scored."""
    pt, sft = sweep.seed_dirs(seed, out_dir)
    llm = os.path.join(out_dir, f"standins-{seed}", "llm")
    for d in (pt, sft, llm):
        os.makedirs(d)
    with open(os.path.join(pt, "config.json"), "w") as f:
        json.dump({"tinyllava_sources": {"llm": llm}}, f)
    with open(os.path.join(llm, "reading.json"), "w") as f:
        json.dump({"seed": seed, "reading_accuracy": reading, "describe_accuracy": describe,
                   "val_reading_accuracy": val[0] if val else 0.0,
                   "val_describe_accuracy": val[1] if val else 0.0}, f)
    files = [("answers.jsonl", answers), ("answers_chat.jsonl", turns)]
    files += [("answers_val.jsonl", val[2]), ("answers_val_chat.jsonl", val[3])] if val else []
    for name, rows in files:
        with open(os.path.join(sft, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out_dir, f"seed{seed}", "time.json"), "w") as f:
        json.dump({"seconds": seconds}, f)


def test_score_tables_the_runs_without_training(tmp_path, capsys):
    out = str(tmp_path)
    q = lambda kind, ok: {"type": kind, "correct": ok}  # noqa: E731
    t = lambda turn, ok: {"turn": turn, "correct": ok}  # noqa: E731
    fake_run(out, 0, 0.9, 0.8, [q("color", True), q("color", False), q("position", True)],
             [t(1, False), t(2, True)], seconds=100)
    fake_run(out, 1, 0.5, 0.6, [q("color", True), q("color", True), q("position", False)],
             [t(1, True), t(2, True)], seconds=300)
    sweep.main(["--score", "--out-dir", out, "--seeds", "0", "1"])
    rows = json.load(open(os.path.join(out, "sweep.json")))
    assert [r["accuracy"] for r in rows] == [{"all": 2 / 3, "color": 0.5, "position": 1.0},
                                             {"all": 2 / 3, "color": 1.0, "position": 0.0}]
    assert [r["conversation"] for r in rows] == [{"all": 0.5, "turn 1": 0.0, "turn 2": 1.0},
                                                 {"all": 1.0, "turn 1": 1.0, "turn 2": 1.0}]
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    # reading, describe, all, color, position, chat all, turn 1, turn 2, time
    assert lines["min"] == ["50.0%", "60.0%", "66.7%", "50.0%", "0.0%", "50.0%", "0.0%", "100.0%", "100s"]
    assert lines["median"] == ["70.0%", "70.0%", "66.7%", "75.0%", "50.0%", "75.0%", "50.0%", "100.0%",
                               "200s"]


def test_score_names_a_seed_that_has_not_run(tmp_path):
    with pytest.raises(InputError, match="seed 3: no finished run"):
        sweep.main(["--score", "--out-dir", str(tmp_path), "--seeds", "3"])


def test_val_split_scores_the_validation_files(tmp_path, capsys):
    """--split val tables the validation questions and conversations, never the test ones."""
    out = str(tmp_path)
    q = lambda kind, ok: {"type": kind, "correct": ok}  # noqa: E731
    t = lambda turn, ok: {"turn": turn, "correct": ok}  # noqa: E731
    fake_run(out, 0, 0.9, 0.8, [q("color", True)], [t(1, True)], seconds=100,
             val=(0.7, 0.6, [q("count", False), q("count", True)], [t(1, False), t(1, True), t(2, False)]))
    sweep.main(["--score", "--split", "val", "--out-dir", out, "--seeds", "0"])
    [row] = json.load(open(os.path.join(out, "sweep_val.json")))
    assert (row["reading"], row["describe"]) == (0.7, 0.6)
    assert row["accuracy"] == {"all": 0.5, "count": 0.5}
    assert row["conversation"] == {"all": 1 / 3, "turn 1": 0.5, "turn 2": 0.0}
    assert capsys.readouterr().out.splitlines()[-1].split() == [
        "median", "70.0%", "60.0%", "50.0%", "50.0%", "33.3%", "50.0%", "0.0%", "100s"]


def test_jobs_run_seeds_at_once_on_a_share_of_the_threads(tmp_path, monkeypatch):
    """--jobs 2: the data set is made first, once; then two seeds' pipelines run at the same time, each
    with OMP_NUM_THREADS = cores / 2; a failed seed stops the sweep with one error naming its log, and
    the seeds not started yet never start."""
    out, calls, order = str(tmp_path), [], []
    monkeypatch.setattr(sweep.standins, "ensure_shapes", lambda data_dir: order.append("data"))
    both_started = threading.Barrier(2, timeout=30)

    def fake_stage(cmd, cwd, stdout, stderr, env):  # one stage: both seeds' first stages must overlap
        seed = int(cmd[cmd.index("--seed") + 1])
        calls.append((seed, os.path.basename(cmd[1]), env["OMP_NUM_THREADS"]))
        order.append(seed)
        if cmd[1] == "train_pt.py":
            both_started.wait()  # times out (BrokenBarrierError) unless the other seed runs too
        elif seed == 0:
            time.sleep(1)  # busy until well after seed 1 has failed: seed 2 can only go to seed 1's worker
        return subprocess.CompletedProcess(cmd, returncode=3 if seed == 1 and cmd[1] == "train_sft.py" else 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_stage)
    with pytest.raises(InputError, match=r"seed 1: train_sft.py failed \(exit 3\); see .*train_sft.log"):
        sweep.main(["--out-dir", out, "--seeds", "0", "1", "2", "--jobs", "2"])
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert order[0] == "data" and order.count("data") == 1
    assert sorted(calls) == [(0, "train_pt.py", threads), (0, "train_sft.py", threads),
                             (1, "train_pt.py", threads), (1, "train_sft.py", threads)]  # seed 2 never ran
