"""Build the course notebooks from their single source in `course/`, and execute them.

    python tools/build_notebooks.py            # every notebook, executed
    python tools/build_notebooks.py 01 03      # only those whose name starts so
    python tools/build_notebooks.py --no-execute
    python tools/build_notebooks.py --markdown-only 03   # prose edits only: seconds, nothing runs

`--markdown-only` is the cheap path for an edit that touches only Markdown cells: it puts the new
Markdown into the committed, executed notebooks (both notebooks/ and solutions/) and keeps every code
cell as it is: source, outputs, execution count. A Markdown cell whose text did not change is kept
as it is too, so the diff shows only the edited cells. It refuses, and writes nothing, when any code
cell of the source differs from the executed notebook (the outputs would then belong to other code):
such a notebook needs the full build above, with execution.

A source is a Python file in "percent" format: `# %%` starts a code cell, `# %% [markdown]`
a markdown cell (its lines start with "# "). A cell header may carry the word `solutions`:
such cells also go into the solutions notebook; a cell tagged `solutions-only` goes only there
(the "why it works" note after a solved exercise). Inside a code cell, the lines between
`# BEGIN SOLUTION` and `# END SOLUTION` are the answer: the walkthrough replaces them with
`raise NotImplementedError`, the solutions notebook keeps them. A line ending in
`# solutions-only` appears only in the solutions notebook. So an exercise and its solution
cannot drift apart (the nbgrader idea).
"""

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "course"
SOLUTION_BLOCK = re.compile(r"^([ \t]*)# BEGIN SOLUTION\n.*?^[ \t]*# END SOLUTION\n", re.M | re.S)
SOLUTIONS_ONLY = "# solutions-only"


KNOWN_TAGS = {"solutions", "solutions-only"}
IN_SOLUTIONS = KNOWN_TAGS  # a cell with either tag goes into the solutions notebook
MARKERS = re.compile(r"# (BEGIN|END) SOLUTION\b|" + re.escape(SOLUTIONS_ONLY))


class SourceError(ValueError):
    """A course source the builder would turn into a wrong notebook; names the file and line."""


class NeedsExecution(ValueError):
    """A notebook the cheap --markdown-only path cannot update: its code changed, or it was never built."""


def parse_cells(text, path="<source>"):
    """[(kind, tags, source)] from a percent-format file, after checking its markers and tags."""
    cells = []
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("# %%")]
    for n, start in enumerate(starts):
        header, body_lines = lines[start], lines[start + 1:starts[n + 1] if n + 1 < len(starts) else len(lines)]
        kind = "markdown" if "[markdown]" in header else "code"
        tags = set(header[4:].replace("[markdown]", "").split())
        if tags - KNOWN_TAGS:
            raise SourceError(f"{path}:{start + 1}: unknown cell tag(s) {sorted(tags - KNOWN_TAGS)}; "
                              f"the builder knows {sorted(KNOWN_TAGS)}")
        check_markers(kind, tags, body_lines, path, first_line=start + 2)
        body = "\n".join(body_lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
        cells.append((kind, tags, body))
    return cells


def check_markers(kind, tags, lines, path, first_line):
    """Solution markers pair up, sit in code cells, and only in cells tagged `solutions`:
    otherwise an answer would leak into notebooks/ or an exercise would vanish from solutions/."""
    open_at = None
    for i, line in enumerate(lines, start=first_line):
        marker = MARKERS.search(line)
        if not marker:
            continue
        if kind != "code" or not tags & IN_SOLUTIONS:
            raise SourceError(f"{path}:{i}: {marker.group(0)!r} in a {kind} cell without the 'solutions' tag: "
                              f"the marker would be ignored (write '# %% solutions' above the cell)")
        if marker.group(1) == "BEGIN":
            if open_at is not None:
                raise SourceError(f"{path}:{i}: BEGIN SOLUTION inside the solution opened at line {open_at}")
            open_at = i
        elif marker.group(1) == "END":
            if open_at is None:
                raise SourceError(f"{path}:{i}: END SOLUTION without a BEGIN SOLUTION before it")
            open_at = None
    if open_at is not None:
        raise SourceError(f"{path}:{open_at}: BEGIN SOLUTION without an END SOLUTION in the same cell: "
                          f"the answer would leak into the walkthrough")


def student_source(source):
    source = SOLUTION_BLOCK.sub(
        lambda m: f'{m.group(1)}raise NotImplementedError("Exercise: write your code here")\n', source + "\n"
    ).rstrip("\n")
    return "\n".join(line for line in source.splitlines() if not line.rstrip().endswith(SOLUTIONS_ONLY))


def solution_source(source):
    source = re.sub(r"^[ \t]*# (BEGIN|END) SOLUTION\n?", "", source, flags=re.M)
    return re.sub(r"[ \t]*" + SOLUTIONS_ONLY + "$", "", source, flags=re.M)


def make_cell(kind, source):
    return nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)


def new_notebook(cells):
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def build(source_path):
    """(walkthrough, solutions) notebooks for one course source file."""
    cells = parse_cells(source_path.read_text(), source_path.relative_to(ROOT) if source_path.is_relative_to(ROOT)
                        else source_path)
    walkthrough = new_notebook([
        make_cell(kind, student_source(src) if kind == "code" else src)
        for kind, tags, src in cells if "solutions-only" not in tags
    ])
    title = next(src for kind, _, src in cells if kind == "markdown").splitlines()[0].lstrip("# ")
    intro = (f"# Solutions: {title}\n\nThe solved exercises of `notebooks/{source_path.stem}.ipynb`: each "
             "with its statement, the solution, its check, why it works and the wrong answers the check "
             "catches. Try them yourself first!")
    solutions = new_notebook([make_cell("markdown", intro)] + [
        make_cell(kind, solution_source(src) if kind == "code" else src)
        for kind, tags, src in cells if tags & IN_SOLUTIONS
    ])
    return walkthrough, solutions


def targets(source_path, root=ROOT):
    """(walkthrough, solutions) paths of the notebooks built from one course source file."""
    return (root / "notebooks" / f"{source_path.stem}.ipynb",
            root / "solutions" / f"{source_path.stem}_solutions.ipynb")


def update_markdown(executed, built, name):
    """`executed` (a notebook as committed, executed) with the Markdown of `built` (a fresh build of its
    source). Its code cells keep their outputs and execution counts; they must be the source's code
    cells exactly, or the outputs would belong to other code: NeedsExecution."""
    old_code = [c for c in executed.cells if c.cell_type == "code"]
    new_code = [c for c in built.cells if c.cell_type == "code"]
    changed = [n for n, (old, new) in enumerate(zip(old_code, new_code), start=1) if old.source != new.source]
    if changed or len(old_code) != len(new_code):
        what = f"code cell {changed[0]} differs" if changed else f"has {len(new_code)} code cells, not {len(old_code)}"
        raise NeedsExecution(f"{name}: the source {what}: its outputs would be stale; rebuild it with execution: "
                             f"python tools/build_notebooks.py {name[:2]}")
    unchanged = {}  # Markdown text -> the committed cells with it: kept, ids too, so the diff stays small
    for cell in executed.cells:
        if cell.cell_type == "markdown":
            unchanged.setdefault(cell.source, []).append(cell)
    code, cells = iter(old_code), []
    for cell in built.cells:
        if cell.cell_type == "code":
            cells.append(next(code))
        elif unchanged.get(cell.source):
            cells.append(unchanged[cell.source].pop(0))
        else:
            cells.append(cell)
    executed.cells = cells
    return executed


def update_markdown_in_place(built, paths):
    """[(notebook, path)]: the executed notebooks at `paths` with the Markdown of `built`, their fresh
    build, ready to write. Raises NeedsExecution when one of them needs a full build."""
    updated = []
    for nb, path in zip(built, paths):
        if not path.exists():
            raise NeedsExecution(f"{path.name} has not been built yet: python tools/build_notebooks.py "
                                 f"{path.name[:2]}")
        updated.append((update_markdown(nbformat.read(path, as_version=4), nb, path.name), path))
    return updated


def execute(nb, cwd):
    env_dir = tempfile.mkdtemp(prefix="moe-nb-")
    for var in ("MPLCONFIGDIR", "IPYTHONDIR", "JUPYTER_RUNTIME_DIR"):
        os.environ.setdefault(var, os.path.join(env_dir, var.lower()))
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="name prefixes, e.g. 01")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--no-execute", action="store_true")
    how.add_argument("--markdown-only", action="store_true",
                     help="update the Markdown of the executed notebooks; refused if any code cell changed")
    args = parser.parse_args()
    sources = sorted(p for p in SOURCES.glob("[0-9]*.py") if not args.only or p.stem.startswith(tuple(args.only)))
    if not sources:
        sys.exit(f"no course sources match {args.only} in {SOURCES}")
    try:
        built = {src: build(src) for src in sources}  # every source is checked before anything runs
    except SourceError as err:
        sys.exit(f"error: {err}")
    if args.markdown_only:
        try:  # every notebook is checked before any is written: a refusal leaves them all as they were
            updated = [pair for src in sources for pair in update_markdown_in_place(built[src], targets(src))]
        except NeedsExecution as err:
            sys.exit(f"error: {err}\nnothing was written")
        for nb, path in updated:
            nbformat.write(nb, path)
            print(f"updated the markdown of {path.relative_to(ROOT)}")
        return
    for src in sources:
        for nb, path in zip(built[src], targets(src)):
            if not args.no_execute:
                print(f"executing {path.relative_to(ROOT)} ...", flush=True)
                execute(nb, path.parent)
            nbformat.write(nb, path)
            print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
