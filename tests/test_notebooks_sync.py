"""The committed notebooks are built from course/ sources and committed executed, in order."""

import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_notebooks  # noqa: E402

SOURCES = sorted((ROOT / "course").glob("[0-9]*.py"))


def sources_of(nb):
    return [(c.cell_type, c.source) for c in nb.cells]


def committed_sources(path):
    """[(kind, text)] of the notebook file at `path`: what must equal sources_of(a fresh build)."""
    return [(c["cell_type"], "".join(c["source"])) for c in json.loads(path.read_text())["cells"]]


def execution_problem(path):
    """Why the notebook at `path` does not read as one run top to bottom, or None."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in cells]
    if None in counts or counts != sorted(counts):
        return f"{path.name} is not fully executed in order"
    if any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", [])):
        return f"{path.name} was saved with an error output"
    return None


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebooks_match_their_source(source):
    for expected, path in zip(build_notebooks.build(source), build_notebooks.targets(source)):
        assert committed_sources(path) == sources_of(expected), (
            f"{path.name} differs from {source.relative_to(ROOT)}: run python tools/build_notebooks.py "
            f"{source.stem[:2]} (--markdown-only if only Markdown changed)"
        )


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")) +
                         sorted((ROOT / "solutions").glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_executed_top_to_bottom(path):
    problem = execution_problem(path)
    assert problem is None, problem


TINY = "# %% [markdown]\n# # 09 · Tiny\n#\n# One sentence.\n\n# %% solutions\nx = 1\nprint(x)\n"


def tiny_executed_course(tmp_path):
    """A one-exercise course source in tmp_path/course and its two notebooks, as if executed: each code
    cell has an execution count and an output (no kernel needed)."""
    source = tmp_path / "course" / "09_tiny.py"
    source.parent.mkdir()
    source.write_text(TINY)
    for nb, path in zip(build_notebooks.build(source), build_notebooks.targets(source, tmp_path)):
        for count, cell in enumerate((c for c in nb.cells if c.cell_type == "code"), start=1):
            cell.execution_count = count
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
        path.parent.mkdir()
        nbformat.write(nb, path)
    return source


def test_markdown_only_edit_keeps_the_executed_code_cells(tmp_path):
    source = tiny_executed_course(tmp_path)
    paths = build_notebooks.targets(source, tmp_path)
    before = [nbformat.read(path, as_version=4) for path in paths]
    source.write_text(TINY.replace("One sentence.", "One better sentence.\n#\n# And a second paragraph."))
    built = build_notebooks.build(source)
    for nb, path in build_notebooks.update_markdown_in_place(built, paths):
        nbformat.write(nb, path)
    after = [nbformat.read(path, as_version=4) for path in paths]
    for old, new, expected, path in zip(before, after, built, paths):
        assert committed_sources(path) == sources_of(expected)  # what the checks above accept
        assert execution_problem(path) is None
        code = [[c for c in nb.cells if c.cell_type == "code"] for nb in (old, new)]
        assert code[0] == code[1]  # source, outputs, execution count and id: untouched
    assert "One better sentence." in after[0].cells[0].source
    assert after[1].cells[0] == before[1].cells[0]  # an unchanged Markdown cell is kept as it was, id too


def test_markdown_only_refuses_a_changed_code_cell(tmp_path):
    source = tiny_executed_course(tmp_path)
    paths = build_notebooks.targets(source, tmp_path)
    source.write_text(TINY.replace("One sentence.", "Edited.").replace("x = 1", "x = 2"))
    built = build_notebooks.build(source)
    with pytest.raises(build_notebooks.NeedsExecution, match="09_tiny.ipynb: the source code cell 1 differs.*"
                                                             "python tools/build_notebooks.py 09"):
        build_notebooks.update_markdown_in_place(built, paths)
    assert committed_sources(paths[0]) != sources_of(built[0])  # the sync check fails until it is rebuilt


def test_sync_checks_refuse_an_unexecuted_notebook(tmp_path):
    source = tiny_executed_course(tmp_path)
    walkthrough, _ = build_notebooks.build(source)  # built with --no-execute: no execution counts
    path = build_notebooks.targets(source, tmp_path)[0]
    nbformat.write(walkthrough, path)
    assert committed_sources(path) == sources_of(walkthrough)
    assert execution_problem(path) == "09_tiny.ipynb is not fully executed in order"


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
