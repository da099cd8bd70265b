"""2. Warm against cold: a one-shot script that loads the model and generates (a fresh process
each time, what a user without a daemon runs) against the same job sent to a warm daemon, both
with `sdbridge generate` (a fresh CLI process, as a user types it) and from a connected client."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.common import (
    CACHE,
    PROMPT,
    REPO,
    Stats,
    default_model,
    model_label,
    model_parser,
    report,
    set_threads,
    start_daemon,
    table,
)
from sdbridge.wire.client import Client
from sdbridge.wire.protocol import ADDRESS_ENV


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr.decode(errors='replace')}")
    return elapsed


def main() -> None:
    p = model_parser(__doc__.splitlines()[0], repeats=5)
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 2, 4
    set_threads(args.threads)
    model = args.model or default_model(args.native)
    out = CACHE / "warm-cold"
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    daemon = start_daemon(model, out)
    os.environ[ADDRESS_ENV] = daemon.address  # for `sdbridge generate`, whatever its options
    cold, cli, client_s = [], [], []
    try:
        with Client(daemon.address, timeout=60) as client:
            for repeat in range(args.repeats + 1):  # the first round warms the page cache
                seed = str(repeat)
                one = [python, "-m", "bench.oneshot", str(model), str(out / "cold.png"), seed]
                cold.append(timed([*one, str(args.steps)]))
                cli.append(
                    timed(
                        [
                            python,
                            "-m",
                            "sdbridge",
                            "generate",
                            PROMPT,
                            "--seed",
                            seed,
                            "--steps",
                            str(args.steps),
                            "-q",
                            "-o",
                            str(out / "warm.png"),
                        ]
                    )
                )
                start = time.perf_counter()
                client.generate(prompt=PROMPT, seed=repeat, num_inference_steps=args.steps).result(
                    timeout=600
                )
                client_s.append(time.perf_counter() - start)
    finally:
        daemon.stop()
    cold, cli, client_s = cold[1:], cli[1:], client_s[1:]
    ratio_cli = Stats.of([c / w for c, w in zip(cold, cli, strict=True)])
    ratio_client = Stats.of([c / w for c, w in zip(cold, client_s, strict=True)])
    print(
        f"model {model_label(model)}, {args.steps} steps, {args.threads} threads; "
        f"median [min..max] over {args.repeats} runs"
    )
    table(
        ["how", "ms", "cold / this"],
        [
            ["cold: load + generate script", Stats.of(cold).show(1e3, 0), "1"],
            ["warm: sdbridge generate (CLI)", Stats.of(cli).show(1e3, 0), ratio_cli.show(1, 1)],
            ["warm: connected client", Stats.of(client_s).show(1e3, 0), ratio_client.show(1, 1)],
        ],
    )
    report("warm_vs_cold_speedup", ratio_cli.median)


if __name__ == "__main__":
    main()
