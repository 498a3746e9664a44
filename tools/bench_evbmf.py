"""Time EVBMF rank estimation on a 512 x 4608 unfolding (a 512@3x3 conv's mode-0 unfolding).

    python tools/bench_evbmf.py                 # 1 BLAS thread (default), JSON then a table
    python tools/bench_evbmf.py --threads 2     # as many BLAS threads as asked
    python tools/bench_evbmf.py --compare       # both, each in a fresh process

BLAS threads are pinned through environment variables set before numpy is imported (threadpoolctl
is not a dependency), so each thread count runs in its own process. The matrix is planted rank plus
Gaussian noise, float32 like an ONNX weight. Timed: ``singular_values`` + ``evbmf_rank`` (median of
--repeats runs after one warm-up), and each part separately; scipy's ``svdvals`` is timed once
beside them as the reference route.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    parser.add_argument("--compare", action="store_true", help="run with 1 and 2 threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs (default 7)")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=4608)
    parser.add_argument("--rank", type=int, default=96, help="planted rank (default 96)")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _measure(args: argparse.Namespace) -> dict:
    for var in _THREAD_VARS:
        os.environ[var] = str(args.threads)
    import statistics
    import time

    import numpy as np
    import scipy.linalg

    if str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))  # run from a checkout without installing
    from onnxlr.evbmf import evbmf_rank, singular_values

    rng = np.random.default_rng(0)
    rows, cols, rank = args.rows, args.cols, args.rank
    left = np.linalg.qr(rng.standard_normal((rows, rank)))[0]
    right = np.linalg.qr(rng.standard_normal((cols, rank)))[0]
    strength = 3.0 * (rows**0.5 + cols**0.5) * np.linspace(4.0, 1.0, rank)
    matrix = ((left * strength) @ right.T + rng.standard_normal((rows, cols))).astype(np.float32)

    def clock(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    clock(lambda: evbmf_rank(singular_values(matrix), matrix.shape))  # warm-up
    sv_times, rank_times = [], []
    for _ in range(args.repeats):
        t_sv, sv = clock(lambda: singular_values(matrix))
        t_rank, est = clock(lambda: evbmf_rank(sv, matrix.shape))
        sv_times.append(t_sv)
        rank_times.append(t_rank)
    totals = [a + b for a, b in zip(sv_times, rank_times)]
    t_svdvals, _ = clock(lambda: scipy.linalg.svdvals(matrix.astype(np.float64)))
    return {
        "shape": [rows, cols],
        "planted_rank": rank,
        "blas_threads": args.threads,
        "repeats": args.repeats,
        "median_total_s": statistics.median(totals),
        "median_singular_values_s": statistics.median(sv_times),
        "median_evbmf_rank_s": statistics.median(rank_times),
        "min_total_s": min(totals),
        "scipy_svdvals_once_s": t_svdvals,
        "rank": est.rank,
        "signal_rank": est.signal_rank,
        "sigma2": est.sigma2,
        "under_0_5_s": statistics.median(totals) < 0.5,
    }


def _table(results: list[dict]) -> str:
    head = "threads  total(med)  singular_values  evbmf_rank  scipy svdvals  rank  sigma2"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['blas_threads']:>7}  {r['median_total_s']:>9.3f}s  "
            f"{r['median_singular_values_s']:>14.3f}s  {r['median_evbmf_rank_s']:>9.4f}s  "
            f"{r['scipy_svdvals_once_s']:>12.3f}s  {r['rank']:>4}  {r['sigma2']:.4g}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.compare:
        results = []
        for threads in (1, 2):
            cmd = [sys.executable, __file__, "--json-only", "--threads", str(threads),
                   "--repeats", str(args.repeats), "--rows", str(args.rows),
                   "--cols", str(args.cols), "--rank", str(args.rank)]
            env = dict(os.environ, **{var: str(threads) for var in _THREAD_VARS})
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                return done.returncode
            results.append(json.loads(done.stdout))
    else:
        results = [_measure(args)]
    if args.json_only:
        print(json.dumps(results[0]))
        return 0
    print(json.dumps(results, indent=2))
    print()
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
