"""Throughput of CpmBeeTokenizer (automaton path and pure-Python reference path) against the original VisCPM.

    python benchmarks/bench_tokenizer.py [--size-mb 1] [--chunk-chars 1000] [--whole-original]
                                         [--reference-python /tmp/viscpm-ref/bin/python]

The text is >= 1 MB of mixed zh/en user text built deterministically by tests/fixtures/record/corpus.py and
escaped to markup. It is encoded in chunks of `--chunk-chars` characters (prompt-sized strings, one call each)
and as one whole string. The original's `encode` slices the rest of its input at every position, so its time
grows quadratically with string length: it runs on the chunks, and on the whole string only with
`--whole-original` (about 80 s per MB here). It runs in this interpreter when `VisCPM` is importable, else in
the reference interpreter through a subprocess. All paths must return identical ids and ext tables; the
script prints MB/s (UTF-8 bytes of the user text) and the speed ratios.
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

DEFAULT_REFERENCE_PYTHON = "/tmp/viscpm-ref/bin/python"
REFERENCE_PYTHONPATH = ROOT.parent / "shared" / "reference"

# Runs inside the reference interpreter: encode each markup string, report seconds and [ids, ext] per string.
_ORIGINAL_SCRIPT = """
import json, sys, time
from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer
markups = json.load(open(sys.argv[1], encoding="utf-8"))
tok = CPMBeeTokenizer()
start = time.perf_counter()
results = [tok.encode(m) for m in markups]
seconds = time.perf_counter() - start
json.dump({"seconds": seconds, "results": results}, open(sys.argv[2], "w"))
"""

Results = list[tuple[list[int], dict[int, str]]]


def timed(fn, repeat: int = 1) -> tuple[float, Results]:
    """Best wall time of `repeat` runs, and the last result."""
    best, result = float("inf"), []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_original(markups: list[str], reference_python: str | None) -> tuple[float, Results] | None:
    """The original's seconds and per-string (ids, ext table), or None when it cannot be run here."""
    if importlib.util.find_spec("VisCPM") is not None:
        from VisCPM.cpm_tokenizers.bee import CPMBeeTokenizer

        original = CPMBeeTokenizer()
        return timed(lambda: [original.encode(m) for m in markups])
    if reference_python is None or not Path(reference_python).exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "markups.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(markups), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=str(REFERENCE_PYTHONPATH))
        subprocess.run(
            [reference_python, "-W", "ignore", "-c", _ORIGINAL_SCRIPT, str(src), str(out)], check=True, env=env
        )
        result = json.loads(out.read_text())
    return result["seconds"], [(ids, {int(k): v for k, v in ext.items()}) for ids, ext in result["results"]]


def report(name: str, seconds: float, mb: float) -> None:
    print(f"  {name:<34} {seconds:8.3f} s  {mb / seconds:8.2f} MB/s")


def bench(label: str, tok: CpmBeeTokenizer, texts: list[str], mb: float, run_orig: bool, args) -> None:
    markups = [tok.escape(t) for t in texts]
    print(f"{label}: {len(texts):,} string(s)")
    fast_s, fast = timed(lambda: [tok.encode_markup(m) for m in markups], args.repeat)
    call_s, calls = timed(lambda: [tok(t).input_ids for t in texts])
    pure_s, pure = timed(lambda: [tok._encode_markup_reference(m) for m in markups])
    assert pure == fast, "the pure-Python path disagrees with the automaton path"
    assert calls == [ids for ids, _ in fast], "tokenizer(text) disagrees with encode_markup(escape(text))"
    print(f"  {sum(len(ids) for ids, _ in fast):,} ids, {sum(len(ext) for _, ext in fast):,} ext-table entries")
    report("ours, automaton: encode_markup", fast_s, mb)
    report("ours, automaton: tokenizer(text)", call_s, mb)
    report("ours, pure Python: encode_markup", pure_s, mb)
    print(f"  automaton / pure Python: {pure_s / fast_s:.1f}x")
    if not run_orig:
        return
    original = run_original(markups, args.reference_python)
    if original is None:
        print("  original: VisCPM not importable and no reference interpreter (--reference-python); skipped")
        return
    orig_s, orig = original
    assert orig == fast, "the original's ids or ext tables differ from ours"
    report("original: encode (identical ids)", orig_s, mb)
    print(f"  automaton / original: {orig_s / fast_s:.1f}x;  pure Python / original: {orig_s / pure_s:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1.0, help="UTF-8 megabytes of text (at least this many)")
    parser.add_argument("--chunk-chars", type=int, default=1000, help="characters per string in the chunked run")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for our automaton path")
    parser.add_argument("--whole-original", action="store_true", help="also run the original on the whole text")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON, help="interpreter with VisCPM")
    args = parser.parse_args()

    text = corpus.plain_text(int(args.size_mb * (1 << 20)))
    mb = len(text.encode("utf-8")) / 1e6
    start = time.perf_counter()
    tok = CpmBeeTokenizer()
    tok.encode_markup("warm up")  # builds the automaton
    print(
        f"text: {mb:.2f} MB, {len(text):,} characters; tokenizer + automaton built in {time.perf_counter() - start:.2f} s"
    )
    chunks = [text[i : i + args.chunk_chars] for i in range(0, len(text), args.chunk_chars)]
    bench(f"chunks of {args.chunk_chars} characters", tok, chunks, mb, True, args)
    bench("whole text as one string", tok, [text], mb, args.whole_original, args)


if __name__ == "__main__":
    main()
