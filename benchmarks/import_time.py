"""How long ``import sparse_nlp`` and ``sparse-nlp --help`` take, and which heavy modules they load.

Each measurement is a fresh interpreter (``python -c``), timed from outside (wall clock) and with
``python -X importtime`` (the cumulative microseconds of the ``sparse_nlp`` line). Prints one JSON object.

    python benchmarks/import_time.py --runs 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "transformers.modeling_utils", "datasets", "evaluate")


def _wall(code: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *code], check=True, capture_output=True)
        out.append(round(time.perf_counter() - start, 3))
    return out


def _importtime_ms() -> float:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import sparse_nlp"],
        check=True,
        capture_output=True,
        text=True,
    )
    line = [x for x in done.stderr.splitlines() if re.search(r"\|\s+sparse_nlp$", x)][-1]
    return int(line.split("|")[1]) / 1000


def _heavy_loaded(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return done.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()
    result = {
        "import_sparse_nlp_wall_s": _wall(["-c", "import sparse_nlp"], args.runs),
        "cli_help_wall_s": _wall(["-m", "sparse_nlp.cli", "--help"], args.runs),
        "importtime_cumulative_ms": [_importtime_ms() for _ in range(args.runs)],
        "heavy_modules_after_import": _heavy_loaded("import sparse_nlp"),
        "heavy_modules_after_cli_help": _heavy_loaded(
            "import contextlib, io, sparse_nlp.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    sparse_nlp.cli.main(['--help'])"
        ),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for key in ("import_sparse_nlp_wall_s", "cli_help_wall_s", "importtime_cumulative_ms"):
        result[f"median_{key}"] = statistics.median(result[key])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
