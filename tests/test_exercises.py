"""Every exercise in notebooks/ has a solution and a check, and every check can fail."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moe_tutorial.exercises.ch01  # noqa: F401  (registers the checks)
from moe_tutorial.exercises import CHECKS

ROOT = Path(__file__).resolve().parent.parent
CHECK_CALL = re.compile(r"check_(\w+)\((\w+)\)")


def notebook_cells(path):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def exercises_in(path):
    """{exercise name: function name} for each `check_<name>(<fn>)` call in a notebook."""
    return {m.group(1): m.group(2) for src in notebook_cells(path) for m in CHECK_CALL.finditer(src)}


def solution_namespace(notebook):
    """Run the solutions notebook's cells (they define the solved functions) in one namespace."""
    namespace = {}
    for src in notebook_cells(notebook):
        if "NBVAL_SKIP" not in src:
            exec(compile(src, str(notebook), "exec"), namespace)
    return namespace


# Wrong answers for each exercise: each check must reject every one of them.
def _no_mask(scores):
    return F.softmax(scores, dim=-1)


def _mask_no_softmax(scores):
    T = scores.size(-1)
    return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), 0.0)


def _softmax_wrong_dim(scores):
    T = scores.size(-1)
    return F.softmax(scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), dim=-2)


def _head_unscaled(x, key, query, value):
    return F.scaled_dot_product_attention(query(x), key(x), value(x), is_causal=True, scale=1.0)


def _head_not_causal(x, key, query, value):
    return F.scaled_dot_product_attention(query(x), key(x), value(x))


def _head_swapped(x, key, query, value):
    return F.scaled_dot_product_attention(key(x), query(x), value(x), is_causal=True)


def _probs_no_temperature(logits, temperature, top_k):
    return F.softmax(logits, dim=-1)


def _probs_times_temperature(logits, temperature, top_k):
    return F.softmax(logits * temperature, dim=-1)


def _probs_ignores_top_k(logits, temperature, top_k):
    return F.softmax(logits / temperature, dim=-1)


def _unsolved(*args):
    raise NotImplementedError


WRONG_ANSWERS = {
    "causal_attention_weights": [_no_mask, _mask_no_softmax, _softmax_wrong_dim, lambda s: s[:, :2]],
    "attention_head": [_head_unscaled, _head_not_causal, _head_swapped],
    "next_token_probs": [_probs_no_temperature, _probs_times_temperature, _probs_ignores_top_k],
}

WALKTHROUGHS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def test_every_registered_check_has_wrong_answers():
    assert set(CHECKS) == set(WRONG_ANSWERS)


@pytest.mark.parametrize("name", sorted(WRONG_ANSWERS))
def test_check_rejects_wrong_answers(name, capsys):
    for wrong in WRONG_ANSWERS[name]:
        assert CHECKS[name](wrong) is False, f"check for {name} accepted {wrong.__name__}"
        assert capsys.readouterr().out.startswith(f"✗ {name}: ")
    assert CHECKS[name](_unsolved) is False
    assert "not implemented yet" in capsys.readouterr().out


@pytest.mark.parametrize("walkthrough", WALKTHROUGHS, ids=lambda p: p.stem)
def test_every_exercise_has_a_check_and_a_passing_solution(walkthrough, capsys):
    exercises = exercises_in(walkthrough)
    assert len(exercises) >= 2, f"{walkthrough.name} has fewer exercises than the course promises"
    solutions = ROOT / "solutions" / f"{walkthrough.stem}_solutions.ipynb"
    assert solutions.exists(), f"{solutions} is missing"
    assert exercises_in(solutions) == exercises
    walkthrough_code = "\n".join(notebook_cells(walkthrough))
    namespace = solution_namespace(solutions)
    for name, fn_name in exercises.items():
        assert name in CHECKS, f"no check registered for exercise {name}"
        assert 'raise NotImplementedError("Exercise' in walkthrough_code
        assert CHECKS[name](namespace[fn_name]) is True, capsys.readouterr().out
