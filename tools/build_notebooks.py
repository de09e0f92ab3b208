"""Build the course notebooks from their single source in `course/`, and execute them.

    python tools/build_notebooks.py            # every notebook, executed
    python tools/build_notebooks.py 01 03      # only those whose name starts so
    python tools/build_notebooks.py --no-execute

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


def execute(nb, cwd):
    env_dir = tempfile.mkdtemp(prefix="moe-nb-")
    for var in ("MPLCONFIGDIR", "IPYTHONDIR", "JUPYTER_RUNTIME_DIR"):
        os.environ.setdefault(var, os.path.join(env_dir, var.lower()))
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="name prefixes, e.g. 01")
    parser.add_argument("--no-execute", action="store_true")
    args = parser.parse_args()
    sources = sorted(p for p in SOURCES.glob("[0-9]*.py") if not args.only or p.stem.startswith(tuple(args.only)))
    if not sources:
        sys.exit(f"no course sources match {args.only} in {SOURCES}")
    try:
        built = {src: build(src) for src in sources}  # every source is checked before anything runs
    except SourceError as err:
        sys.exit(f"error: {err}")
    for src in sources:
        for nb, path in zip(built[src], (ROOT / "notebooks" / f"{src.stem}.ipynb",
                                         ROOT / "solutions" / f"{src.stem}_solutions.ipynb")):
            if not args.no_execute:
                print(f"executing {path.relative_to(ROOT)} ...", flush=True)
                execute(nb, path.parent)
            nbformat.write(nb, path)
            print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
