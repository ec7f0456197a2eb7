"""The tokenize stage's first Arrow write and read in a process: the project's
`write_tokens` and `read_tokens` against the same through pyarrow's `pa.array` and
`to_numpy`, each in a new interpreter, and whether each imported pandas.

    python bench/arrow_first_write.py --corpus input.txt [--rounds 3]

pyarrow asks pandas about a numpy array given to `pa.array` (`pandas_api.is_categorical`)
and converts with `to_numpy` through its pandas machinery, importing pandas wherever it is
installed (`python/pyarrow/array.pxi`, pyarrow 25 and 26); the project builds the column
from the array's buffer and reads it back as a view of the mapped buffer. Each round runs
both forms, alternating, on the corpus's token ids (Tiny Shakespeare's: 1.1M); a run's
figure is the write and the read, in seconds, after the imports. Prints a line per run,
then one JSON line. Without pandas the two differ by pyarrow's own conversion alone
(milliseconds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMS = ("project", "pa.array")

CHILD = """
import json, sys, time
root, corpus, form, path = sys.argv[1:5]
sys.path.insert(0, root)
import numpy as np
import pyarrow as pa
from mlx_model.data import Vocab, read_tokens, write_tokens
text = open(corpus, encoding="utf-8").read()
ids = Vocab.from_text(text).encode(text)
before = "pandas" in sys.modules
t = time.perf_counter()
if form == "project":
    write_tokens(path, ids, {"split": "train"})
    back = read_tokens(path)[0]
else:
    table = pa.table({"tokens": pa.array(ids)})
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    column = pa.ipc.open_file(pa.memory_map(path)).read_all().column("tokens")
    back = column.chunk(0).to_numpy(zero_copy_only=True)
seconds = time.perf_counter() - t
assert np.array_equal(back, ids)
result = {"form": form, "seconds": seconds, "pandas_before": before}
print(json.dumps({**result, "pandas_after": "pandas" in sys.modules}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    first, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(
        description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--corpus", required=True, help="Tiny Shakespeare's input.txt")
    p.add_argument("--rounds", type=int, default=3, help="runs of each form (default 3)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if not Path(args.corpus).is_file():
        p.error(f"--corpus: no such file: {args.corpus}")
    try:
        text = Path(args.corpus).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        p.error(f"--corpus: cannot read {args.corpus} as UTF-8 text: {err}")
    if len(text) < 2:
        p.error(f"--corpus: {args.corpus} holds {len(text)} characters; give a text corpus")
    return args


def run(corpus: str, form: str, folder: Path) -> dict:
    """One form's first write and read, in a new interpreter."""
    path = folder / f"{form}.arrow"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), corpus, form, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{form}: exit {proc.returncode}: {proc.stderr.strip()[-1000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs: dict[str, list[dict]] = {form: [] for form in FORMS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for form in FORMS:
                result = run(args.corpus, form, Path(tmp))
                runs[form].append(result)
                print(
                    f"{form:9s} {result['seconds']:.4f} s, pandas imported: "
                    f"{result['pandas_after'] and not result['pandas_before']}"
                )
    import pyarrow

    report = {
        "pyarrow": pyarrow.__version__,
        "pandas_installed": _pandas_installed(),
        "seconds": {form: [round(r["seconds"], 4) for r in runs[form]] for form in FORMS},
        "imported_pandas": {
            form: [r["pandas_after"] and not r["pandas_before"] for r in runs[form]]
            for form in FORMS
        },
    }
    print(json.dumps(report))
    return report


def _pandas_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("pandas") is not None


if __name__ == "__main__":
    main()
