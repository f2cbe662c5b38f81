"""Throughput of CpmBeeTokenizer (fast path and pure-Python reference path) against the original VisCPM.

    python benchmarks/bench_tokenizer.py [--size-mb 1] [--chunk-chars 200 1000 10000] [--repeat 5]
                                         [--original-repeat 3] [--clock wall|cpu] [--whole-original]
                                         [--reference-python /tmp/viscpm-ref/bin/python]

What is measured. The text is >= 1 MB of mixed zh/en user text, built deterministically by
tests/fixtures/record/corpus.py. For each `--chunk-chars` N it is cut into strings of N characters (prompt-sized
inputs), and each string is encoded by its own call, the way a user calls the tokenizer:

  * `encode_markup(markup)`: our call with the original's contract (CPM-Bee markup in, ids and ext table out),
    on `escape(text)`; the headline ratio compares it with the original's `encode(markup)` on the same markup.
  * `tokenizer(text)`: the transformers call on the plain text (escaping + `BatchEncoding` included).
  * `tokenizer(texts)`: one batched transformers call over all strings (one shared ext table).
  * pure Python: the reference path of the tests (tests/_reference_tokenizer.py), one run.
  * original: VisCPM's `CPMBeeTokenizer.encode(markup)`; in this interpreter when `VisCPM` is importable,
    else in the reference interpreter through a subprocess (only its encode loop is timed there).

Times are the best of `--repeat` runs (ours) and `--original-repeat` runs (the original), by the wall clock, or
with `--clock cpu` by each process's CPU time (every path is single-threaded, so on an idle machine the two agree;
on a machine shared with other jobs CPU time keeps the ratios steady). Throughput is UTF-8 megabytes of the user
text per second. Every path must return the same ids and ext tables (the batched call: the same text on decode).
The whole text as one string runs for ours; the original's `encode` slices the rest of its input at every position,
so its time grows quadratically with string length, and it runs on the whole string only with `--whole-original`
(about 80 s per MB here).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers_viscpm.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "record"))
import corpus  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from _reference_tokenizer import encode_markup_reference  # noqa: E402

DEFAULT_REFERENCE_PYTHON = "/tmp/viscpm-ref/bin/python"
REFERENCE_PYTHONPATH = ROOT.parent / "shared" / "reference"
GOAL = 50.0  # each of GOAL_PATHS / original, at every chunk size
GOAL_PATHS = ("encode_markup", "tokenizer(text)", "tokenizer(texts)")

# Runs inside the reference interpreter: encode each markup string `repeat` times over, report the best
# seconds and [ids, ext] per string.
_ORIGINAL_SCRIPT = """
import json, sys, time
from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer
markups = json.load(open(sys.argv[1], encoding="utf-8"))
tok = CPMBeeTokenizer()
clock = getattr(time, sys.argv[4])
best = float("inf")
for _ in range(int(sys.argv[3])):
    start = clock()
    results = [tok.encode(m) for m in markups]
    best = min(best, clock() - start)
json.dump({"seconds": best, "results": results}, open(sys.argv[2], "w"))
"""

Results = list[tuple[list[int], dict[int, str]]]
CLOCKS = {"wall": "perf_counter", "cpu": "process_time"}
clock = time.perf_counter


def timed(fn, repeat: int = 1):
    """Best wall time of `repeat` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = clock()
        result = fn()
        best = min(best, clock() - start)
    return best, result


def run_original(
    markups: list[str], reference_python: str | None, repeat: int, clock_name: str
) -> tuple[float, Results] | None:
    """The original's best seconds and per-string (ids, ext table), or None when it cannot be run here."""
    if importlib.util.find_spec("VisCPM") is not None:
        from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer

        original = CPMBeeTokenizer()
        return timed(lambda: [original.encode(m) for m in markups], repeat)
    if reference_python is None or not Path(reference_python).exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "markups.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(markups), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=str(REFERENCE_PYTHONPATH))
        subprocess.run(
            [
                reference_python,
                "-W",
                "ignore",
                "-c",
                _ORIGINAL_SCRIPT,
                str(src),
                str(out),
                str(repeat),
                CLOCKS[clock_name],
            ],
            check=True,
            env=env,
        )
        result = json.loads(out.read_text())
    return result["seconds"], [(ids, {int(k): v for k, v in ext.items()}) for ids, ext in result["results"]]


def report(name: str, seconds: float, mb: float) -> None:
    print(f"  {name:<40} {seconds:8.3f} s  {mb / seconds:8.2f} MB/s")


def bench(label: str, tok: CpmBeeTokenizer, texts: list[str], mb: float, run_orig: bool, args) -> dict[str, float]:
    """Seconds per path for one way of cutting the text; prints them and the ratios."""
    markups = [tok.escape(t) for t in texts]
    print(f"{label}: {len(texts):,} string(s), one call each")
    times: dict[str, float] = {}
    times["encode_markup"], fast = timed(lambda: [tok.encode_markup(m) for m in markups], args.repeat)
    times["tokenizer(text)"], calls = timed(lambda: [tok(t).input_ids for t in texts], args.repeat)
    times["tokenizer(texts)"], batch = timed(lambda: tok(texts), args.repeat)
    times["pure Python"], pure = timed(lambda: [encode_markup_reference(tok, m) for m in markups])
    assert pure == fast, "the pure-Python path disagrees with the fast path"
    assert calls == [ids for ids, _ in fast], "tokenizer(text) disagrees with encode_markup(escape(text))"
    assert tok.batch_decode(batch.input_ids, ext_table=batch.ext_table) == texts, "tokenizer(texts) loses text"
    print(f"  {sum(len(ids) for ids, _ in fast):,} ids, {sum(len(ext) for _, ext in fast):,} ext-table entries")
    report("ours: encode_markup(markup) per string", times["encode_markup"], mb)
    report("ours: tokenizer(text) per string", times["tokenizer(text)"], mb)
    report("ours: tokenizer(texts), one batched call", times["tokenizer(texts)"], mb)
    report("ours: pure-Python reference path", times["pure Python"], mb)
    if not run_orig:
        return times
    original = run_original(markups, args.reference_python, args.original_repeat, args.clock)
    if original is None:
        print("  original: VisCPM not importable and no reference interpreter (--reference-python); skipped")
        return times
    times["original"], orig = original
    assert orig == fast, "the original's ids or ext tables differ from ours"
    report("original: encode(markup) (identical ids)", times["original"], mb)
    ratios = ", ".join(f"{name} {times['original'] / times[name]:.1f}x" for name in list(times)[:4])
    print(f"  speed-up over the original: {ratios}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1.0, help="UTF-8 megabytes of text (at least this many)")
    parser.add_argument(
        "--chunk-chars", type=int, nargs="+", default=[200, 1000, 10000], help="characters per string (one call each)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="best of N for our paths (pure Python: one run)")
    parser.add_argument("--original-repeat", type=int, default=3, help="best of N for the original")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a machine shared with other jobs)",
    )
    parser.add_argument("--whole-original", action="store_true", help="also run the original on the whole text")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON, help="interpreter with VisCPM")
    args = parser.parse_args()
    global clock
    clock = getattr(time, CLOCKS[args.clock])

    text = corpus.plain_text(int(args.size_mb * (1 << 20)))
    mb = len(text.encode("utf-8")) / 1e6
    start = time.perf_counter()
    tok = CpmBeeTokenizer()
    tok.encode_markup("warm up")  # builds the matcher
    print(
        f"text: {mb:.2f} MB, {len(text):,} characters; tokenizer + matcher ({type(tok._matcher).__name__}) built in"
        f" {time.perf_counter() - start:.2f} s"
    )
    rows = []
    for chunk_chars in args.chunk_chars:
        chunks = [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
        rows.append(
            (f"{chunk_chars:,} chars", bench(f"chunks of {chunk_chars:,} characters", tok, chunks, mb, True, args))
        )
    rows.append(("whole text", bench("whole text as one string", tok, [text], mb, args.whole_original, args)))

    print(
        f"\nsummary: MB/s by {args.clock} clock ({mb:.2f} MB of text, one call per string;"
        " x = speed-up over the original)"
    )
    names = ["encode_markup", "tokenizer(text)", "tokenizer(texts)", "original"]
    print(f"  {'strings of':<14}" + "".join(f"{name:>24}" for name in names))
    verdicts = []
    for label, times in rows:
        cells = []
        for name in names:
            if name not in times:
                cells.append("-")
                continue
            cell = f"{mb / times[name]:.2f}"
            if "original" in times and name != "original":
                cell += f" ({times['original'] / times[name]:.0f}x)"
            cells.append(cell)
        print(f"  {label:<14}" + "".join(f"{cell:>24}" for cell in cells))
        if "original" in times and label != "whole text":
            for name in GOAL_PATHS:
                ratio = times["original"] / times[name]
                verdicts.append(f"{label.strip()} {name}: {ratio:.0f}x {'met' if ratio >= GOAL else 'NOT met'}")
    print(f"goal: each of {', '.join(GOAL_PATHS)} >= {GOAL:.0f}x the original, per chunk size:")
    print("  " + ("\n  ".join(verdicts) or "not measured"))


if __name__ == "__main__":
    main()
