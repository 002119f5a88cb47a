"""The checker's machinery: the exercise registry, a Checker that explains its verdicts, the runner.

Nothing here knows about LLaVA: a check receives the student's function and a Checker, and calls
c.check / c.close in order; the first failure stops that exercise.
"""

import contextlib
import importlib.util
import math
import os
import sys
import time
import traceback

import torch

EXERCISES_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # exercises/
ROOT = os.path.dirname(EXERCISES_DIR)  # the repository root


class Failed(Exception):
    pass


class Checker:
    """Prints PASS for each check that holds; the first that does not prints FAIL with details and
    stops the exercise."""

    def __init__(self):
        self.passed = 0

    def check(self, what, ok, expected=None, got=None, hint=None):
        if ok:
            print(f"  PASS  {what}")
            self.passed += 1
            return
        print(f"  FAIL  {what}")
        got = got() if callable(got) else got
        if expected is not None:
            print(f"        expected: {expected}")
        if got is not None:
            print(f"        got:      {got}")
        hint = hint() if callable(hint) else hint
        if hint:
            print(f"        hint:     {hint}")
        raise Failed(what)

    def close(self, what, got, want, atol=1e-5, hint=None):
        """Check that tensor `got` has want's shape and values (max absolute difference <= atol)."""
        if not torch.is_tensor(got):
            self.check(what, False, expected=f"a tensor of shape {tuple(want.shape)}",
                       got=describe(got), hint=hint)
        if got.shape != want.shape:
            self.check(what, False, expected=f"shape {tuple(want.shape)}",
                       got=f"shape {tuple(got.shape)}", hint=hint)
        diff = max_diff(got, want)
        self.check(what, diff <= atol, expected=f"max |difference| <= {atol:g}",
                   got=f"max |difference| = {diff:.3g}", hint=hint)

    def show(self, text):
        print("\n".join("        " + line for line in text.splitlines()))


def describe(x):
    if torch.is_tensor(x):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"[:120]


def max_diff(a, b):
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        return math.inf
    d = (a.detach().double() - b.detach().double()).abs()
    return math.inf if d.isnan().any() else (d.max().item() if d.numel() else 0.0)


def diagnose(got, mistakes, default=None, atol=1e-5):
    """The hint of the first known mistake whose result `got` reproduces, else the default hint."""
    def hint():
        for wrong, why in mistakes:
            try:
                if max_diff(got, wrong() if callable(wrong) else wrong) <= atol:
                    return why
            except Exception:
                pass
        return default
    return hint


def gen(seed):
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def patched(obj, name, value):
    """obj.name = value for the duration: how a check plugs a student's function into tinyllava."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)

# -----------------------------------------------------------------------------
# The registry: @exercise(number, module, function, title) on each exercise's check


EXERCISES = {}


class Exercise:
    def __init__(self, number, module, function, title, check):
        self.number, self.module, self.function, self.title = number, module, function, title
        self.check = check

    def path(self, solutions=False):
        return os.path.join(EXERCISES_DIR, "solutions" if solutions else "", self.module + ".py")


def exercise(number, module, function, title):
    def register(check):
        EXERCISES[number] = Exercise(number, module, function, title, check)
        return check
    return register


def load_function(ex, solutions):
    """The exercise's function from exercises/NN_name.py, or from exercises/solutions/NN_name.py."""
    path = ex.path(solutions)
    name = f"exercise_{ex.module}{'_solution' if solutions else ''}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, ex.function, None)
    if fn is None:
        raise AttributeError(f"{os.path.relpath(path)} defines no function `{ex.function}`")
    return fn


def run_one(ex, solutions=False, fn=None):
    """Check one exercise: the function in the student's file, the solution, or `fn` if given
    (tests)."""
    rel = os.path.relpath(ex.path(solutions), ROOT)
    print(f"\nExercise {ex.number}: {ex.title}   ({rel if fn is None else fn.__qualname__})")
    c, t0 = Checker(), time.time()
    try:
        fn = load_function(ex, solutions) if fn is None else fn
        ex.check(fn, c)
    except Failed:
        return False
    except NotImplementedError:
        print(f"  TODO  not written yet: fill in `{ex.function}` in {rel} "
              "(it still raises NotImplementedError)")
        return False
    except Exception as e:
        # point at the student's own line when the error comes from their file
        where = [f for f in traceback.extract_tb(e.__traceback__)
                 if os.path.abspath(f.filename) == ex.path(solutions)]
        at = f" at line {where[-1].lineno}: {where[-1].line}" if where else ""
        print(f"  FAIL  your code raised {type(e).__name__}: {e}{at}")
        if not where:
            print("        (the error was raised outside your file; the traceback follows)")
            traceback.print_exc(limit=-4, file=sys.stdout)
        return False
    print(f"  ===>  exercise {ex.number} passes ({c.passed} checks, {time.time() - t0:.1f}s)")
    return True


def run(numbers, solutions=False):
    """Check the given exercises; True if all pass."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast and leaves the other cores alone
    try:
        results = {n: run_one(EXERCISES[n], solutions) for n in numbers}
    finally:
        torch.set_num_threads(threads)
    if len(numbers) > 1:
        ok = [n for n, r in results.items() if r]
        todo = [n for n in numbers if n not in ok]
        still = f"; still to do: {todo}" if len(ok) < len(numbers) else ""
        print(f"\n{len(ok)} of {len(numbers)} exercises pass{still}")
    return all(results.values())
