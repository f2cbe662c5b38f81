"""Start-up time of the `viscpm` command line: `--help` and argument errors must answer without importing torch.

Each command runs in a fresh interpreter (as a user types it), interleaved over rounds; the medians are printed
against the cost of `import torch` and of the full `import transformers_viscpm` (the library path, which registers
every model). The verdict compares `viscpm --help` with the 1 s goal and with the library import.

    python benchmarks/bench_cli.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "viscpm --help": ["-m", "transformers_viscpm", "--help"],
    "viscpm paint --help": ["-m", "transformers_viscpm", "paint", "--help"],
    "viscpm paint --steps 0 (argument error)": [
        "-m", "transformers_viscpm", "paint", "--model", "org/repo", "a cat", "-o", "x.png", "--steps", "0",
    ],
    "viscpm paint -o x.bogus (output error)": [
        "-m", "transformers_viscpm", "paint", "--model", "org/repo", "a cat", "-o", "x.bogus",
    ],
    "python -c 'import torch'": ["-c", "import torch"],
    "python -c 'import transformers_viscpm'": ["-c", "import transformers_viscpm"],
}  # fmt: skip
GOAL_S = 1.0


def run_once(args: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    codes: dict[str, set[int]] = {name: set() for name in COMMANDS}
    for _ in range(rounds):
        for name, args in COMMANDS.items():
            seconds, code = run_once(args)
            times[name].append(seconds)
            codes[name].add(code)
    median = {name: statistics.median(values) for name, values in times.items()}
    width = max(map(len, COMMANDS))
    print(f"{'command':<{width}}  median s   min s   exit")
    for name in COMMANDS:
        print(f"{name:<{width}}  {median[name]:8.3f}  {min(times[name]):6.3f}   {sorted(codes[name])}")
    help_s, library_s = median["viscpm --help"], median["python -c 'import transformers_viscpm'"]
    print(f"\n`viscpm --help` / `import transformers_viscpm`: {help_s / library_s:.3f}x")
    verdict = "PASS" if help_s < GOAL_S else "FAIL"
    print(f"verdict: {verdict}: `viscpm --help` answers in {help_s:.2f} s (goal < {GOAL_S:.0f} s)")


if __name__ == "__main__":
    main()
