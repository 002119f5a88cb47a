"""
Checks the classroom exercises against tinyllava's own behaviour, then plugs them into the model.

    python exercises/check.py 1                # check your exercises/01_shifted_loss.py
    python exercises/check.py 3 5 6            # several
    python exercises/check.py all              # every exercise
    python exercises/check.py all --solutions  # the reference solutions, exercises/solutions/ (CI)

Each exercise is a list of checks run in order; the first failure stops that exercise and says what
was expected, what your function gave, and a hint. The exit code is 0 only if every exercise checked
passes. Everything runs on a CPU in seconds, on tiny random models built directly with tinyllava.

This file is the command line. The checks live in exercises/checks/: framework.py (the registry,
the Checker, the runner), toy.py (the tiny models and data) and one module per exercise,
c01_shifted_loss.py to c11_seeing_inside.py.
"""

import argparse
import sys
import time

from checks import EXERCISES, load_function, run, run_one

__all__ = ["EXERCISES", "load_function", "main", "run", "run_one"]  # what tests/ and study.py use


def main(argv=None):
    parser = argparse.ArgumentParser(description="check the tinyllava classroom exercises")
    parser.add_argument("exercises", nargs="+", help="exercise numbers, or 'all'")
    parser.add_argument("--solutions", action="store_true",
                        help="check the reference solutions instead of your files")
    args = parser.parse_args(argv)
    numbers = sorted(EXERCISES) if args.exercises == ["all"] else []
    for a in args.exercises if not numbers else []:
        if not a.isdigit() or int(a) not in EXERCISES:
            parser.error(f"unknown exercise {a!r}; choose from {sorted(EXERCISES)} or 'all'")
        numbers.append(int(a))
    t0 = time.time()
    ok = run(numbers, args.solutions)
    print(f"({time.time() - t0:.1f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
