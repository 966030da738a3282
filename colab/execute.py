"""Run the notebooks in colab/ top to bottom and keep their outputs (what GitHub shows).

    python colab/execute.py                      # every notebook, full mode, outputs saved in place
    python colab/execute.py colab/lowrank.ipynb --quick --no-save   # CI's short mode, a check only

Each notebook runs in a fresh Python kernel (ipykernel) started in a scratch folder, so its `runs/`
do not land in the repository; `--quick` sets JAXMODELS_NOTEBOOK_QUICK=1, which every notebook
reads to shrink its work to seconds. A failing cell stops the run and names the cell.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent


def run_notebook(path: str | Path, quick: bool = False, save: bool = True, timeout: int = 1800
                 ) -> tuple[float, nbformat.NotebookNode]:
    """Execute one notebook in a scratch folder; with `save`, write it back with its outputs.
    Returns the seconds it took and the executed notebook; raises CellExecutionError (naming the
    cell) when a cell fails."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env = {"JAXMODELS_NOTEBOOK_QUICK": "1" if quick else "0", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f"{path.stem}-") as scratch:
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": scratch}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    if save:
        nbformat.write(nb, path)
    return time.perf_counter() - start, nb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="default: every colab/*.ipynb")
    ap.add_argument("--quick", action="store_true", help="the short mode CI runs (JAXMODELS_NOTEBOOK_QUICK=1)")
    ap.add_argument("--no-save", action="store_true", help="check only; leave the files as they are")
    args = ap.parse_args(argv)
    for path in args.notebooks or sorted(HERE.glob("*.ipynb")):
        try:
            seconds, _ = run_notebook(path, quick=args.quick, save=not args.no_save)
        except CellExecutionError as err:
            print(f"{path}: a cell failed:\n{err}", file=sys.stderr)
            return 1
        print(f"{path}: ran in {seconds:.0f}s" + ("" if args.no_save else ", outputs saved"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
