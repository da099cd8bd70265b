"""Run every CPU benchmark, each in a fresh interpreter, and end with their result lines.

    python -m bench [--quick] [--threads N] [--only NAME ...]

Extra arguments after `--` go to every benchmark. The GPU benchmark runs apart: bench/gpu.sh.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import REPO

BENCHMARKS = [
    "overhead",
    "warm_cold",
    "previews",
    "clients",
    "unet",
    "client_import",
    "cluster",
    "simulate_cluster",
    "live_latency",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS)
    p.add_argument("extra", nargs="*", help="after --: passed to every benchmark")
    args = p.parse_args()
    common = ["--threads", str(args.threads), *(["--quick"] if args.quick else []), *args.extra]
    summary, failed = [], []
    for name in args.only:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        lines: list[str] = []
        with subprocess.Popen(
            [sys.executable, "-m", f"bench.{name}", *common],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        ) as process:
            for line in process.stdout:
                print(line, end="", flush=True)
                lines.append(line.rstrip())
        if process.returncode:
            failed.append(name)
        last = next((line for line in reversed(lines) if line), "")
        summary.append(
            f"{last if not process.returncode else f'{name}: FAILED'}"
            f"  ({time.perf_counter() - start:.0f} s)"
        )
    print("\n=== summary ===")
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
