"""
The offline pipeline over several seeds: does the recipe learn whatever the initialisation and the data order?

    python -m tools.sweep                    # seeds 0-4, one after the other (minutes each)
    python -m tools.sweep --seeds 0 1 --out-dir runs/sweep

Each seed runs `train_pt.py --seed S` then `train_sft.py --seed S` (stage 0's stand-ins, stage 1 and stage 2
all drawn from that seed; the shapes data set and its held-out questions are the same for every seed), then
prints one row per seed: the stand-in LLM's reading accuracy (the held-out questions with the scene given
as soft words: what a perfect projector would reach), the held-out exact match overall and per question
type, and the wall time; and the minimum and median over the seeds. The table is also written as JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from tinyllava import InputError, command_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_seed(seed, out_dir):
    """Run the pipeline for one seed; returns its row."""
    pt, sft = os.path.join(out_dir, f"seed{seed}", "pt"), os.path.join(out_dir, f"seed{seed}", "sft")
    steps = [["train_pt.py", "--seed", str(seed), "--out-dir", pt, "--no-progress"],
             ["train_sft.py", "--seed", str(seed), "--pt", pt, "--out-dir", sft, "--no-progress"]]
    t0 = time.time()
    for step in steps:
        log = os.path.join(out_dir, f"seed{seed}", os.path.splitext(step[0])[0] + ".log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            result = subprocess.run([sys.executable, *step], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if result.returncode:
            raise InputError(f"seed {seed}: {step[0]} failed (exit {result.returncode}); see {log}")
    seconds = time.time() - t0
    with open(os.path.join(sft, "answers.jsonl")) as f:
        answers = [json.loads(line) for line in f]
    accuracy = {"all": sum(a["correct"] for a in answers) / len(answers)}
    for t in sorted({a["type"] for a in answers}):
        group = [a["correct"] for a in answers if a["type"] == t]
        accuracy[t] = sum(group) / len(group)
    with open(os.path.join(read_sources(pt)["llm"], "reading.json")) as f:
        reading = json.load(f)["reading_accuracy"]
    return dict(seed=seed, reading=reading, accuracy=accuracy, seconds=round(seconds))


def read_sources(pt_dir):
    with open(os.path.join(pt_dir, "config.json")) as f:
        return json.load(f)["tinyllava_sources"]


def print_table(rows):
    types = list(rows[0]["accuracy"])
    print(f"{'seed':>4} {'reading':>8} " + " ".join(f"{t:>8}" for t in types) + f" {'time':>7}")
    for r in rows:
        print(f"{r['seed']:>4} {r['reading']:8.1%} " + " ".join(f"{r['accuracy'][t]:8.1%}" for t in types)
              + f" {r['seconds']:>6}s")
    for name, fn in (("min", min), ("median", statistics.median)):
        print(f"{name:>4} {fn(r['reading'] for r in rows):8.1%} "
              + " ".join(f"{fn(r['accuracy'][t] for r in rows):8.1%}" for t in types)
              + f" {fn(r['seconds'] for r in rows):>6}s")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out-dir", default="runs/sweep")
    args = parser.parse_args(argv)
    args.out_dir = os.path.abspath(args.out_dir)  # the stages run from the repository root
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args.out_dir))
        row = rows[-1]
        print(f"seed {seed}: exact match {row['accuracy']['all']:.1%} in {row['seconds']} s", flush=True)
    print_table(rows)
    with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    command_line(main)
