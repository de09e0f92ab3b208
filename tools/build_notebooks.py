"""Build the course notebooks from their single source in `course/`, and execute them.

    python tools/build_notebooks.py            # every notebook, executed
    python tools/build_notebooks.py 01 03      # only those whose name starts so
    python tools/build_notebooks.py --no-execute

A source is a Python file in "percent" format: `# %%` starts a code cell, `# %% [markdown]`
a markdown cell (its lines start with "# "). A cell header may carry the word `solutions`:
such cells also go into the solutions notebook. Inside a code cell, the lines between
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


def parse_cells(text):
    """[(kind, tags, source)] from a percent-format file."""
    cells = []
    for chunk in re.split(r"^# %%", text, flags=re.M)[1:]:
        header, _, body = chunk.partition("\n")
        kind = "markdown" if "[markdown]" in header else "code"
        tags = set(header.replace("[markdown]", "").split())
        body = body.strip("\n")
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
        cells.append((kind, tags, body))
    return cells


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
    cells = parse_cells(source_path.read_text())
    walkthrough = new_notebook([
        make_cell(kind, student_source(src) if kind == "code" else src) for kind, _, src in cells
    ])
    title = next(src for kind, _, src in cells if kind == "markdown").splitlines()[0].lstrip("# ")
    intro = (f"# Solutions: {title}\n\nThe solved exercises of `notebooks/{source_path.stem}.ipynb`, "
             "each followed by its check. Try them yourself first!")
    solutions = new_notebook([make_cell("markdown", intro)] + [
        make_cell(kind, solution_source(src) if kind == "code" else src)
        for kind, tags, src in cells if "solutions" in tags
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
    for src in sources:
        for nb, path in zip(build(src), (ROOT / "notebooks" / f"{src.stem}.ipynb",
                                         ROOT / "solutions" / f"{src.stem}_solutions.ipynb")):
            if not args.no_execute:
                print(f"executing {path.relative_to(ROOT)} ...", flush=True)
                execute(nb, path.parent)
            nbformat.write(nb, path)
            print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
