"""Smoke test of tools/bench.py: `--quick` builds both implementations on the same tiny random
weights, passes the parity check, times (and profiles) every row in fp32 and bf16, and writes a JSON
report with every figure filled in; a mistake on the command line gets a one-line error, no
traceback.
It proves the script runs end to end; it measures nothing (timings on toy shapes mean nothing).

Run: python -m pytest -q tests/test_bench.py
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tinyllava import InputError

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args, timeout=60, **kw):
    """Run `python -m tools.bench ARGS` from the repo root, as a user would."""
    cmd = [sys.executable, "-m", "tools.bench", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def test_bench_quick_runs_checks_parity_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    # one thread: toy-sized ops gain nothing from more, and stay fast on a machine that is busy
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--quick", "--repeats", "1", "--profile", "--json", str(out)]
    proc = run_bench(*args, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["parity"]["ok"] and report["parity"]["max_logits_diff"] <= 1e-5
    rows = {(r["row"], r["dtype"]) for r in report["rows"]}
    names = ["prefill-b1", "prefill-b8", "decode-b1", "decode-b8", "train-b8"]
    assert rows == {(n, d) for n in names for d in ("fp32", "bf16")}
    for r in report["rows"]:
        assert (r["ours_s"] > 0 and r["transformers_s"] > 0
                and math.isclose(r["ratio"], r["transformers_s"] / r["ours_s"]))
        assert r["flops"] > 0 and r["mfu_ours"] > 0  # CPU: the peak is measured, never unknown
        assert r["profile_ours"]["ops"] > 10  # --profile: the aten ops one call dispatches
        # the matrix products alone: measured for prefill and training, a part of the call's time
        # (with slack for noise)
        assert ("matmul_floor_s" in r) == (not r["row"].startswith("decode"))
        assert r.get("matmul_floor_s", 1) > 0 and r.get("matmul_floor_s", 0) < 2 * r["ours_s"]
        if r["row"].startswith("decode"):
            # --quick asks for 8 new tokens; neither side stopped early
            assert r["tokens"] == r["batch"] * 8
            assert (r["mbu_ours"] > 0
                    and math.isclose(r["mbu_ours"] / r["mbu_transformers"], r["ratio"]))
    assert report["read_bandwidth"] > 0
    # the table is printed too
    assert "decode-b1" in proc.stdout and "ratio" in proc.stdout and "MBU ours" in proc.stdout
    # and the profiles' tables
    assert "tinyllava, train-b8 bf16:" in proc.stdout and "aten::mm" in proc.stdout


def test_bench_refuses_bad_arguments():
    proc = run_bench("--dtype", "fp16")
    assert proc.returncode != 0 and "unknown 'fp16'" in proc.stderr


def test_bench_reports_a_missing_model_in_one_line():
    proc = run_bench("--model", "/nonexistent")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_bench_rows_take_prefixes_and_any_batch_size():
    from tools import bench

    default = ["prefill-b1", "prefill-b8", "decode-b1", "decode-b8", "train-b8"]
    assert [r[0] for r in bench.plan(None)] == default
    # inference before training (training changes the weights), smaller batches first
    assert bench.plan("train-b64,decode,prefill-b8,train-b8") == [
        ("prefill-b8", "prefill", 8), ("decode-b1", "decode", 1), ("decode-b8", "decode", 8),
        ("train-b8", "train", 8), ("train-b64", "train", 64)]
    with pytest.raises(InputError, match="no row 'train-b0'"):
        bench.plan("train-b0")


def test_matmul_products_count_forward_and_the_backward_that_will_run():
    from tools import bench

    frozen, first, second = torch.nn.Linear(3, 4), torch.nn.Linear(4, 5), torch.nn.Linear(5, 2)
    frozen.requires_grad_(False)  # like the vision tower: forward only
    model = torch.nn.Sequential(frozen, first, second)
    products = bench.matmul_products(model, lambda: model(torch.randn(6, 3)).sum().backward())
    assert products == {
        ("x @ W.T", 6, 3, 4): 1, ("x @ W.T", 6, 4, 5): 1, ("x @ W.T", 6, 5, 2): 1,
        ("dY.T @ X", 6, 4, 5): 1, ("dY.T @ X", 6, 5, 2): 1,  # the trained weights' gradients
        # the input's gradient only where the input has one: not into the frozen layer
        ("dY @ W", 6, 5, 2): 1,
    }
    with torch.no_grad():  # inference: the forward products alone
        assert sum(bench.matmul_products(model, lambda: model(torch.randn(2, 7, 3))).values()) == 3


def test_data_bench_runs_on_a_small_data_set():
    """tools/data_bench.py end to end on a few samples: it prints each of its figures."""
    args = ["--samples", "200", "--images", "4", "--sizes", "32", "--workers", "0", "1", "--steps", "1",
            "--batch-size", "4"]
    proc = subprocess.run([sys.executable, "-m", "tools.data_bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("data set start-up", "from the cache", "bytes per sample", "loader at 32 px: 0 workers",
                 "1 workers", "train step at 32 px"):
        assert line in proc.stdout, proc.stdout
