"""
The offline pipeline over several seeds: does the recipe learn whatever the initialisation and the
data order?

    python -m tools.sweep                    # seeds 0-4, one after the other (minutes each)
    python -m tools.sweep --seeds 0 1 --out-dir runs/sweep
    python -m tools.sweep --split val        # the table on the validation split: choose recipes here
    python -m tools.sweep --jobs 2           # two seeds at a time, one thread each on 2 cores

Each seed runs `train_pt.py --seed S` then `train_sft.py --seed S` (stage 0's stand-ins, stage 1 and
stage 2 all drawn from that seed; the shapes data set and its held-out questions are the same for
every seed), then prints one row per seed: the stand-in LLM given each held-out scene as soft words
(what a perfect projector would reach), answering the held-out questions ("reading") and describing
the images ("describe"); the held-out exact match overall and per question type, the held-out
conversations' exact match overall and per turn (test_chat.json, each turn after the model's own
earlier answers), and the wall time; then the minimum and median over the seeds. The table is also
written to OUT_DIR/sweep.json (sweep_val.json with --split val).

--jobs N runs N seeds at a time, each on cores / N threads (OMP_NUM_THREADS): on 2 cores two
one-thread runs finish sooner than one two-thread run after another, and the tables of the README and
docs/results.md were made so. A thread count sums in its own order, so a seed's figures depend on it.

--split val scores the validation split instead (val.json, 400 other images, one question each;
val_chat.json, a conversation about each; and the stand-in's reading of them): a recipe change is
chosen there, and the test table is looked at once, for the recipe chosen. train_sft.py still answers
the test files after training (as the offline pipeline always does); --split val only reads the
validation answers, and `--score` then prints the test table of those same runs without training
them again:

    python -m tools.sweep --split val && python -m tools.sweep --score
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from offline import standins
from tinyllava import InputError, command_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the validation files --split val answers (in data/shapes), each with its longest answer in tokens:
# a description is long
VAL_FILES = {"val": 32, "val_chat": 64}


def seed_dirs(seed, out_dir):
    """(stage 1's and stage 2's output directories) of a seed."""
    return (os.path.join(out_dir, f"seed{seed}", "pt"), os.path.join(out_dir, f"seed{seed}", "sft"))


def run_seed(seed, out_dir, threads=None):
    """Run the pipeline for one seed, on `threads` threads (None: as train.py picks); its wall time in
    seconds, also written to OUT_DIR/seedS/time.json."""
    pt, sft = seed_dirs(seed, out_dir)
    steps = [["train_pt.py", "--seed", str(seed), "--out-dir", pt, "--no-progress"],
             ["train_sft.py", "--seed", str(seed), "--pt", pt, "--out-dir", sft, "--no-progress"]]
    for name in VAL_FILES:  # an earlier run's validation answers, which score_seed would reuse
        if os.path.exists(val_answers(sft, name)):
            os.remove(val_answers(sft, name))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    t0 = time.time()
    for step in steps:
        log = os.path.join(out_dir, f"seed{seed}", os.path.splitext(step[0])[0] + ".log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            result = subprocess.run([sys.executable, *step], cwd=ROOT, stdout=f,
                                    stderr=subprocess.STDOUT, env=env)
        if result.returncode:
            raise InputError(f"seed {seed}: {step[0]} failed (exit {result.returncode}); see {log}")
    seconds = round(time.time() - t0)
    with open(os.path.join(out_dir, f"seed{seed}", "time.json"), "w") as f:
        json.dump({"seconds": seconds}, f)
    return seconds


def score_seed(seed, out_dir, split="test"):
    """The row of a seed whose pipeline has run, scored on `split`."""
    pt, sft = seed_dirs(seed, out_dir)
    done = os.path.join(out_dir, f"seed{seed}", "time.json")
    if not os.path.exists(done):
        raise InputError(f"seed {seed}: no finished run in {os.path.dirname(done)} (run without --score)")
    with open(done) as f:
        seconds = json.load(f)["seconds"]
    with open(os.path.join(read_sources(pt)["llm"], "reading.json")) as f:
        reading = json.load(f)
    if split == "val":
        answers = {name: val_answers(sft, name) for name in VAL_FILES}
        for name, max_new_tokens in VAL_FILES.items():
            if not os.path.exists(answers[name]):
                data_file = os.path.join(ROOT, "data", "shapes", f"{name}.json")
                subprocess.run([sys.executable, "chat.py", "eval", "--model", sft, "--data", data_file,
                                "--out", answers[name], "--max-new-tokens", str(max_new_tokens)],
                               cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return dict(seed=seed, reading=reading["val_reading_accuracy"],
                    describe=reading["val_describe_accuracy"],
                    accuracy=exact_match(answers["val"], "type"),
                    conversation=exact_match(answers["val_chat"], "turn"), seconds=seconds)
    accuracy = exact_match(os.path.join(sft, "answers.jsonl"), "type")
    conversation = exact_match(os.path.join(sft, "answers_chat.jsonl"), "turn")
    return dict(seed=seed, reading=reading["reading_accuracy"], describe=reading["describe_accuracy"],
                accuracy=accuracy, conversation=conversation, seconds=seconds)


def val_answers(sft, name):
    """Where the answers to data/shapes/NAME.json of a --split val sweep go."""
    return os.path.join(sft, f"answers_{name}.jsonl")


def exact_match(answers_file, by):
    """{"all": share correct, and the share per value of `by`} of a chat.py answers file."""
    with open(answers_file) as f:
        answers = [json.loads(line) for line in f]
    shares = {"all": sum(a["correct"] for a in answers) / len(answers)}
    for key in sorted({a[by] for a in answers}):
        group = [a["correct"] for a in answers if a[by] == key]
        shares[f"turn {key}" if by == "turn" else key] = sum(group) / len(group)
    return shares


def read_sources(pt_dir):
    with open(os.path.join(pt_dir, "config.json")) as f:
        return json.load(f)["tinyllava_sources"]


def print_table(rows):
    """One line per seed, then the minimum and the median of every column."""
    columns = {"reading": lambda r: r["reading"], "describe": lambda r: r["describe"]}
    columns.update({t: lambda r, t=t: r["accuracy"][t] for t in rows[0]["accuracy"]})
    columns.update({("chat " + t if t == "all" else t): lambda r, t=t: r["conversation"][t]
                    for t in rows[0].get("conversation", {})})
    print("seed   " + " ".join(f"{name:>8}" for name in columns) + "    time")
    lines = [(str(r["seed"]), [get(r) for get in columns.values()], r["seconds"]) for r in rows]
    for name, fn in (("min", min), ("median", statistics.median)):
        lines.append((name, [fn(get(r) for r in rows) for get in columns.values()],
                      fn(r["seconds"] for r in rows)))
    for name, values, seconds in lines:
        print(f"{name:<6} " + " ".join(f"{v:8.1%}" for v in values) + f" {seconds:>6.0f}s")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out-dir", default="runs/sweep")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run at a time, each on cores / jobs threads (default 1)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="the held-out split the table scores (choose recipes on val)")
    parser.add_argument("--score", action="store_true",
                        help="score the runs already in --out-dir, training nothing: the test table, "
                             "once, of the runs chosen on val")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: at least 1")
    args.out_dir = os.path.abspath(args.out_dir)  # the stages run from the repository root
    if not args.score:
        # made once, here: seeds running at once would each make it, into the same files
        standins.ensure_shapes(os.path.join(ROOT, standins.DATA_DIR))
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        failed = threading.Event()  # once a seed has failed, the seeds not started yet do not start

        def run(seed):
            if failed.is_set():
                return None
            try:
                return run_seed(seed, args.out_dir, threads)
            except BaseException:
                failed.set()
                raise

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            runs = {pool.submit(run, seed): seed for seed in args.seeds}
            for done in concurrent.futures.as_completed(runs):
                seconds = done.result()  # a failure is raised here: one line naming its seed and log
                if seconds is not None:
                    print(f"seed {runs[done]}: trained in {seconds} s", flush=True)
    rows = []
    for seed in args.seeds:
        rows.append(score_seed(seed, args.out_dir, args.split))
        row = rows[-1]
        print(f"seed {seed}: {args.split} exact match {row['accuracy']['all']:.1%} in {row['seconds']} s",
              flush=True)
    print_table(rows)
    name = "sweep.json" if args.split == "test" else f"sweep_{args.split}.json"
    with open(os.path.join(args.out_dir, name), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    command_line(main)
