"""Execute the tutorial notebooks at their own parameters and save them, outputs included,
as the docs site's Tutorials pages (`docs/tutorials/<name>.ipynb`).

    python scripts/execute_notebooks.py [--threads 2] [--only 01_quickstart]

`notebooks/*.ipynb` stay committed without outputs (tests/test_notebooks.py runs them with
small parameters in CI); the executed copies are what this script wrote, with the command,
date, package version and wall time in each notebook's metadata (`melbo_lens_execution`).
`tests/test_docs_site.py` fails when an executed copy's cells differ from its notebook's,
so a changed notebook means rerunning this script. Nothing is edited by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat
import plotly.io as pio
from nbconvert.preprocessors import CoalesceStreamsPreprocessor

import melbo_lens
from melbo_lens.core.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
PLOTLY = "application/vnd.plotly.v1+json"
# where docs/hooks.py puts plotly.js once for the whole site, seen from a tutorial's page
PLOTLY_JS = "../../assets/plotly.min.js"


def static_figures(nb) -> int:
    """Give each Plotly output an HTML form that a static page can show.

    A figure is saved as Plotly's mime bundle, which Jupyter draws and a static page does
    not. Its HTML form loads plotly.js from the site's own copy (no CDN: the site works
    offline). Returns the number of figures.
    """
    n = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if PLOTLY in data:
                fig = pio.from_json(json.dumps(data[PLOTLY]))
                html = pio.to_html(fig, include_plotlyjs=PLOTLY_JS, full_html=False)
                data["text/html"] = html
                n += 1
    return n


def execute(src: Path, dst: Path, threads: int, command: str) -> float:
    """Run `src` top to bottom in this interpreter's kernel; write it with outputs to `dst`."""
    nb = nbformat.read(src, as_version=4)
    setup = nbformat.v4.new_code_cell(
        f"import torch\ntorch.set_num_threads({threads})\n"
        # tqdm's notebook bar needs ipywidgets; its text bar is what the page should show
        "import warnings\nwarnings.filterwarnings('ignore', message='IProgress not found')"
    )
    nb.cells.insert(0, setup)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:  # files a notebook saves stay out of docs/
        client = nbclient.NotebookClient(
            nb, kernel_name="python3", timeout=3600, resources={"metadata": {"path": cwd}}
        )
        client.execute()
    seconds = time.perf_counter() - start
    nb.cells.pop(0)  # the thread setting is the script's, not the tutorial's
    # a progress bar is written line by line with carriage returns: keep what a notebook
    # front end would show, its final state
    CoalesceStreamsPreprocessor().preprocess(nb, {})
    static_figures(nb)
    nb.metadata["melbo_lens_execution"] = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "melbo_lens": melbo_lens.__version__,
        "threads": threads,
        "wall_s": round(seconds, 1),
    }
    atomic_write_text(dst, nbformat.writes(nb))
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the kernel")
    parser.add_argument("--only", action="append", default=None, help="notebook stem(s) to run")
    args = parser.parse_args(argv)
    out = ROOT / "docs" / "tutorials"
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python scripts/execute_notebooks.py", *given])
    for src in sorted((ROOT / "notebooks").glob("*.ipynb")):
        if args.only and src.stem not in args.only:
            continue
        seconds = execute(src, out / src.name, args.threads, command)
        print(f"{src.name}: {seconds:.0f} s -> {(out / src.name).relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    main()
