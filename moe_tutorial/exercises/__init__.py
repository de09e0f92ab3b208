"""Automatic checks for the notebooks' exercises.

Each check takes the learner's function, runs it on inputs where the right answer is known,
prints one clear line and returns True (passed) or False. It never raises, so a notebook
keeps running with exercises left undone:

    ⏳ not implemented yet   the function still raises NotImplementedError
    ✗ <what is wrong>         wrong shape, not causal, rows do not sum to 1, ...
    ✓ passed                  every check held
"""

import functools

import torch

CHECKS = {}  # exercise name -> check function, for the tests that keep notebooks honest


class CheckFailed(Exception):
    """A specific, learner-facing reason why an answer is wrong."""


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


def expect_shape(tensor, shape, what="result"):
    expect(isinstance(tensor, torch.Tensor), f"{what} should be a torch.Tensor, got {type(tensor).__name__}")
    expect(tuple(tensor.shape) == tuple(shape),
           f"{what} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def refuse_library_call(fn, library_fn, why: str):
    """The exercise is to write `library_fn` yourself: an answer that calls it (by its name, or by
    another name bound to it) defeats the point."""
    if fn is library_fn:
        raise CheckFailed(f"write it without calling {library_fn.__name__}: {why}")
    code = getattr(fn, "__code__", None)  # a partial or a builtin has no code to read: nothing to refuse
    names = code.co_names if code is not None else ()
    if library_fn.__name__ in names or any(fn.__globals__.get(n) is library_fn for n in names):
        raise CheckFailed(f"write it without calling {library_fn.__name__}: {why}")


def expect_close(actual, expected, what="result", atol=1e-5, rtol=1e-4):
    expect_shape(actual, expected.shape, what)
    if not torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol):
        err = (actual.double() - expected.double()).abs().max().item()
        raise CheckFailed(f"{what} differs from the expected values (max abs error {err:.3g})")


def check(name):
    """Register `fn(solution)` as the check of exercise `name` and make it learner-friendly."""

    def decorate(fn):
        @functools.wraps(fn)
        def run(solution) -> bool:
            try:
                fn(solution)
            except NotImplementedError:
                print(f"⏳ {name}: not implemented yet. Fill in the function above and rerun this cell.")
                return False
            except CheckFailed as failure:
                print(f"✗ {name}: {failure}")
                return False
            except Exception as err:  # a crash in the learner's code is a finding, not a traceback
                print(f"✗ {name}: your function raised {type(err).__name__}: {err}")
                return False
            print(f"✓ {name}: passed.")
            return True

        CHECKS[name] = run
        return run

    return decorate


def learner_or_package(solved: bool, learner_fn, package_fn, what: str):
    """The learner's function where its check passed, the package's otherwise; prints which, so that
    later cells build on the learner's own code without breaking when an exercise is left undone."""
    print(f"{what}: {'your solution' if solved else 'the package version (the exercise is not solved yet)'}")
    return learner_fn if solved else package_fn
