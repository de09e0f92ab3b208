"""The committed notebooks are built from course/ sources and committed executed, in order."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_notebooks  # noqa: E402

SOURCES = sorted((ROOT / "course").glob("[0-9]*.py"))


def sources_of(nb):
    return [(c.cell_type, c.source) for c in nb.cells]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebooks_match_their_source(source):
    walkthrough, solutions = build_notebooks.build(source)
    for expected, path in ((walkthrough, ROOT / "notebooks" / f"{source.stem}.ipynb"),
                           (solutions, ROOT / "solutions" / f"{source.stem}_solutions.ipynb")):
        committed = json.loads(path.read_text())
        actual = [(c["cell_type"], "".join(c["source"])) for c in committed["cells"]]
        assert actual == sources_of(expected), (
            f"{path.name} differs from {source.relative_to(ROOT)}: run python tools/build_notebooks.py "
            f"{source.stem[:2]}"
        )


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")) +
                         sorted((ROOT / "solutions").glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_executed_top_to_bottom(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in cells]
    assert None not in counts and counts == sorted(counts), f"{path.name} is not fully executed in order"
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} was saved with an error output"


def test_builder_strips_solutions():
    src = ('def f(x):\n    """doc"""\n    # BEGIN SOLUTION\n    return x\n    # END SOLUTION\n'
           'assert f(1)  # solutions-only')
    student = build_notebooks.student_source(src)
    assert "return x" not in student and 'raise NotImplementedError("Exercise' in student
    assert "assert f(1)" not in student
    solved = build_notebooks.solution_source(src)
    assert "return x" in solved and "SOLUTION" not in solved and solved.endswith("assert f(1)")


@pytest.mark.parametrize("source, words", [
    ("# %% solutions\ndef f():\n    # BEGIN SOLUTION\n    return 1\n", "x.py:3: BEGIN SOLUTION without an END"),
    ("# %% solutions\n# END SOLUTION\n", "x.py:2: END SOLUTION without a BEGIN"),
    ("# %% solutions\n# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n", "x.py:3: BEGIN SOLUTION inside"),
    ("# %%\ndef f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n",
     "x.py:3: '# BEGIN SOLUTION' in a code"),
    ("# %%\nassert f(1)  # solutions-only\n", "x.py:2: '# solutions-only' in a code cell without"),
    ("# %% [markdown] solutions\n# # BEGIN SOLUTION\n", "in a markdown cell"),
    ("# %% solution\nx = 1\n", "x.py:1: unknown cell tag(s) ['solution']"),
])
def test_builder_refuses_broken_markers_with_file_and_line(source, words):
    with pytest.raises(build_notebooks.SourceError) as err:
        build_notebooks.parse_cells(source, "x.py")
    assert words in str(err.value)


def test_builder_accepts_well_formed_markers():
    cells = build_notebooks.parse_cells("# %% [markdown]\n# Title\n\n# %% solutions\n# BEGIN SOLUTION\nx = 1\n"
                                        "# END SOLUTION\nassert x  # solutions-only\n", "x.py")
    assert [(kind, sorted(tags)) for kind, tags, _ in cells] == [("markdown", []), ("code", ["solutions"])]


def test_builder_puts_solutions_only_cells_in_solutions_alone(tmp_path):
    source = tmp_path / "09_x.py"
    source.write_text("# %% [markdown]\n# # 09 · X\n\n# %% [markdown] solutions\n# ### Exercise 1\n\n"
                      "# %% solutions\n# BEGIN SOLUTION\nx = 1\n# END SOLUTION\n\n"
                      "# %% [markdown] solutions-only\n# **Why it works.** x is one.\n")
    walkthrough, solutions = build_notebooks.build(source)
    assert not any("Why it works" in c.source for c in walkthrough.cells)
    assert [c.source.strip() for c in solutions.cells[1:]] == ["### Exercise 1", "x = 1", "**Why it works.** x is one."]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_solved_exercises_stand_alone(source):
    """In solutions/, every solved exercise comes with its statement before it and, after its check,
    a note on why it works and which wrong answers the check catches."""
    cells = build_notebooks.parse_cells(source.read_text(), source.name)
    exercises = [i for i, (kind, _, src) in enumerate(cells) if kind == "code" and "# BEGIN SOLUTION" in src]
    assert exercises, f"{source.name} has no exercise"
    for n, i in enumerate(exercises):
        statement = next(j for j in range(i - 1, -1, -1) if cells[j][0] == "markdown")
        _, tags, text = cells[statement]
        assert tags & build_notebooks.IN_SOLUTIONS and "Exercise" in text, (
            f"{source.name}: the statement before exercise cell {i} is not in the solutions notebook "
            f"(tag its markdown cell '# %% [markdown] solutions')")
        end = exercises[n + 1] if n + 1 < len(exercises) else len(cells)
        notes = [src for kind, tags, src in cells[i + 1:end] if kind == "markdown" and "solutions-only" in tags]
        assert any("Why it works" in s and "wrong answer" in s.lower() for s in notes), (
            f"{source.name}: exercise cell {i} has no '# %% [markdown] solutions-only' note with "
            f"'Why it works' and the wrong answers its check catches")
