"""`make bench`: run every ``benchmarks/bench_*.py`` one after another (never in parallel: they time the
machine) and collect the last JSON line each prints into ``bench-out/<name>.json``.

    python benchmarks/run_all.py [NAME ...]      # e.g. `model` runs bench_model.py only

A benchmark exits non-zero when its own correctness check fails (e.g. outputs differ); that fails
`make bench` after every benchmark has run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "bench-out"


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        wanted = {f"bench_{name.removeprefix('bench_').removesuffix('.py')}.py" for name in argv}
        unknown = wanted - {s.name for s in scripts}
        if unknown:
            print(f"unknown benchmark(s) {sorted(unknown)}; have {[s.name for s in scripts]}", file=sys.stderr)
            return 2
        scripts = [s for s in scripts if s.name in wanted]
    OUT.mkdir(exist_ok=True)
    failed = []
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        print(f"== {script.name}", flush=True)
        started = time.monotonic()
        result_file = OUT / f"{name}.json"
        result_file.unlink(missing_ok=True)  # a failed run must not leave an older result looking current
        proc = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        sys.stdout.write(proc.stdout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        ok = proc.returncode == 0
        try:
            if lines:
                result_file.write_text(json.dumps(json.loads(lines[-1]), indent=1) + "\n")
        except json.JSONDecodeError:
            ok = False
            print(f"{script.name}: its last line is not JSON", file=sys.stderr)
        print(f"== {script.name}: exit {proc.returncode} in {time.monotonic() - started:.0f}s", flush=True)
        if not ok:
            failed.append(script.name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
