"""Reduced-basis whitening against full moments, per layer, on the real models' calibration data.

Layers whose input is wider than ``onnxlr.calib.collect.WIDE_INPUT`` keep their statistics in a
reduced basis of ``REDUCED_BASIS`` directions (``fit.ReducedMoments``: W's top right-singular
directions, up to k/2, plus a seeded random complement; isotropic outside). This tool measures what
that costs where the full n x n moments also fit: on every SVD-type layer (Gemm, MatMul with a
constant weight, 1x1 conv, and the im2col patch of a KxK conv under the channel decomposition;
one group only) it streams the layer's input on the model's own calibration data (symmetric
statistics: the original model's inputs; every ``data.HOLDOUT_EVERY``-th sample held out; the
rows ``onnxlr.calib.collect`` would sample), accumulating at once

* full moments (float64, as calibration does), and the same sums accumulated in float32,
* reduced moments for each basis size k < n,
* full moments of the held-out samples,

then fits every layer at rank ``0.5`` (ceil(0.5 min(K, N)) rounded up to 8, the ``auto 0.5``
rank) with ``fit.whitened_svd`` (full, float64 and float32 sums) and ``fit.reduced_whitened_svd``
(reduced), each with and without covariance shrinkage, keeping the better on the held-out rows as
calibration does. The score is ``fit.relative_error`` on the held-out full moments; the table
prints reduced / full per layer and, per model and k, the median and the max of that ratio.

    python tools/bench_reduced_basis.py --out docs/calib            # all models, ~3 min on 2 cores
    python tools/bench_reduced_basis.py --models digits_vgg --ks 64 256

Writes ``<out>/reduced_basis.json`` with every layer's figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# One BLAS thread: the n x n eigendecompositions run 4x slower with two threads on two shared cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KS = (64, 128, 256, 512, 1024)
RANK_FRACTION = 0.5
ROUND_TO = 8
ALL_MODELS = ("digits_vgg", "efficientnet-lite0", "ppocr-v6-rec", "all-minilm-l6-v2")


class _Float32Sums:
    """The sums of fit.Moments (symmetric) accumulated in float32."""

    def __init__(self, n: int):
        self.n, self.count = n, 0
        self.sum_c = np.zeros(n, np.float32)
        self.cc = np.zeros((n, n), np.float32)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        self.count += x.shape[0]
        self.sum_c += x.sum(axis=0, dtype=np.float32)
        self.cc += x.T @ x

    def as_moments(self):
        from onnxlr.calib import fit

        out = fit.Moments(self.n)
        out.count, out.sum_c, out.cc = self.count, self.sum_c.astype(np.float64), self.cc.astype(np.float64)
        return out


def top_basis(w: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """A variant of fit.reduced_basis: W's top right-singular directions up to all k of them (not
    k/2), the seeded Gaussian complement only past W's rank."""
    import scipy.linalg

    values, vectors = scipy.linalg.eigh(w @ w.T, check_finite=False)
    top = min(k, int(np.sum(values > values.max() * 1e-12)))
    order = np.argsort(values)[::-1][:top]
    right = (w.T @ vectors[:, order]) / np.sqrt(values[order])
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(np.concatenate([right, rng.standard_normal((w.shape[1], k - top))], axis=1))
    return basis


def _rank(w: np.ndarray) -> int:
    from onnxlr.ranks import round_up

    full = min(w.shape)
    return round_up(max(1, math.ceil(RANK_FRACTION * full)), ROUND_TO, full)


def collect(name: str, ks: tuple[int, ...], samples: int | None) -> tuple[list[dict], int, float]:
    """Per eligible layer: its moments (see the module docstring); also the samples read, seconds."""
    import onnx
    import scipy.linalg

    from onnxlr import data
    from onnxlr import model as m
    from onnxlr.calib import collect as c
    from onnxlr.calib import fit
    from onnxlr.layers import ConvLayer
    from onnxlr.methods.base import layer_matrices
    from onnxlr.model.edit import prune_to_outputs
    from onnxlr.model.splice import read_bias
    from onnxlr.model.targets import fill_runtime_shapes, find_targets
    from onnxlr.runtime import make_session, run_session
    from tools.eval_suite import MODELS

    spec = MODELS[name]
    model = onnx.load(str(spec.path))
    targets = find_targets(model, m.infer_shapes(model))
    specs = data.model_input_specs(model)
    source = data.open_source(str(spec.calib), specs, what="--calib")
    fill_runtime_shapes(model, targets, next(iter(source)))
    layers = []
    for t in targets:
        if t.layer is None or not t.node.input:
            continue
        n, groups = c.input_width(t.layer)
        if groups != 1 or n <= min(ks):  # depthwise and grouped convs: not SVD layers; no k < n
            continue
        w = layer_matrices(t.layer)[0]
        rank = _rank(w)
        if rank >= min(w.shape):
            continue
        bias, fit_bias = read_bias(t)
        # fit.reduced_basis eigendecomposes the T x T Gram W W^T: for T >> n (a CTC head, 18710 x 120)
        # that takes minutes and gigabytes. R of W = QR has W's right-singular vectors and values,
        # so it gives the same basis (same seed, same shapes) from an n x n Gram.
        small = scipy.linalg.qr(w, mode="r", check_finite=False)[0][: w.shape[1]] if w.shape[0] > n else w
        kind = "kxk" if isinstance(t.layer, ConvLayer) and not t.layer.is_pointwise else (
            "1x1" if isinstance(t.layer, ConvLayer) else t.op_type)
        layers.append({
            "target": t, "tensor": t.node.input[0], "w": w, "bias": bias, "fit_bias": fit_bias, "rank": rank,
            "n": n, "kind": kind, "fit": fit.Moments(n), "held": fit.Moments(n), "f32": _Float32Sums(n),
            "reduced": {k: fit.ReducedMoments(fit.reduced_basis(small, k)) for k in ks if k < n},
            # the top-only variant differs only where k/2 directions do not cover W's row space
            "top": {k: fit.ReducedMoments(top_basis(small, k)) for k in ks if k < n and k // 2 < min(w.shape)},
        })
    tensors = sorted({lay["tensor"] for lay in layers})
    dtypes = {lay["tensor"]: lay["target"].weight_dtype for lay in layers}
    inputs = {vi.name for vi in model.graph.input}
    wanted = [name for name in tensors if name not in inputs]
    session = make_session(prune_to_outputs(model, {name: dtypes[name] for name in wanted}).SerializeToString())
    mask_input = data.row_mask_input(specs, "auto")
    rng = np.random.default_rng(c.SEED)
    seen, started = 0, time.perf_counter()
    for feed in data.batches(data.limited(source, samples), specs, c.CHUNK):
        outs = dict(zip(wanted, run_session(session, feed, wanted, name))) if wanted else {}
        outs.update({name: feed[name] for name in tensors if name in feed})
        row_mask = feed.get(mask_input) if mask_input else None
        for lay in layers:
            x = outs[lay["tensor"]]
            selector, sample_of_row = c._rows(lay["target"], x, rng, row_mask)
            held = ((seen + sample_of_row) % data.HOLDOUT_EVERY) == data.HOLDOUT_EVERY - 1
            rows = c._extract(lay["target"], x, selector)[0]
            lay["fit"].add(rows[~held])
            lay["held"].add(rows[held])
            lay["f32"].add(rows[~held])
            for moments in (*lay["reduced"].values(), *lay["top"].values()):
                moments.add(rows[~held])
        seen += data.sample_rows(feed, specs)
    return layers, seen, time.perf_counter() - started


def _best(fitter, w, b, moments, held, fit_bias) -> tuple[float, float]:
    """(held-out relative error without shrinkage, best of with/without) of one fitter."""
    from onnxlr.calib import fit

    errors = []
    for shrink in (0.0, fit.shrinkage(moments)):
        p, q, nb = fitter(moments, shrink)
        errors.append(fit.relative_error(w, b, q @ p, nb, held))
    return errors[0], min(errors)


def evaluate(lay: dict) -> dict:
    """Held-out relative errors of the data-free, full, float32-summed and reduced fits of a layer."""
    import scipy.linalg

    from onnxlr.calib import fit

    w, b, fit_bias, rank, held = lay["w"], lay["bias"], lay["fit_bias"], lay["rank"], lay["held"]
    u, s, vt = scipy.linalg.svd(w, full_matrices=False)
    free = fit.relative_error(w, b, (u[:, :rank] * s[:rank]) @ vt[:rank], b, held)

    def full(moments, shrink):
        return fit.whitened_svd(w, b, moments, rank, fit_bias, shrink=shrink)

    def reduced(moments, shrink):
        low, new_bias = fit.reduced_whitened_svd(w, b, moments, rank, fit_bias, shrink=shrink)
        return low.p, low.q, new_bias

    plain, best = _best(full, w, b, lay["fit"], held, fit_bias)
    _, best32 = _best(full, w, b, lay["f32"].as_moments(), held, fit_bias)
    row = {"layer": lay["target"].name, "kind": lay["kind"], "n": lay["n"], "out": int(w.shape[0]), "rank": rank,
           "rows": lay["fit"].count, "held_rows": held.count, "data_free": free, "full": best, "full_plain": plain,
           "full_f32": best32, "f32_ratio": best32 / best if best > 0 else 1.0, "reduced": {}, "ratio": {},
           "ratio_plain": {}, "ratio_top": {}}
    for k, moments in lay["reduced"].items():
        r_plain, r_best = _best(reduced, w, b, moments, held, fit_bias)
        row["reduced"][k] = r_best
        row["ratio"][k] = r_best / best if best > 0 else 1.0
        row["ratio_plain"][k] = r_plain / plain if plain > 0 else 1.0
        if k in lay["top"]:
            row["ratio_top"][k] = _best(reduced, w, b, lay["top"][k], held, fit_bias)[1] / best if best > 0 else 1.0
        else:
            row["ratio_top"][k] = row["ratio"][k]
    return row


def summarize(rows: list[dict], ks) -> list[dict]:
    out = []
    for model in sorted({r["model"] for r in rows}, key=lambda x: ALL_MODELS.index(x) if x in ALL_MODELS else 99) + ["all"]:
        mine = [r for r in rows if model in ("all", r["model"])]
        for k in ks:
            ratios = [r["ratio"][k] for r in mine if k in r["ratio"]]
            if not ratios:
                continue
            worst = max((r for r in mine if k in r["ratio"]), key=lambda r: r["ratio"][k])
            top = [r["ratio_top"][k] for r in mine if k in r["ratio"]]
            covered = [r["ratio"][k] for r in mine if k in r["ratio"] and k >= 2 * min(r["n"], r["out"])]
            out.append({"model": model, "k": k, "layers": len(ratios), "median": float(np.median(ratios)),
                        "max": float(max(ratios)), "median_top": float(np.median(top)), "max_top": float(max(top)),
                        "covered": len(covered), "max_covered": float(max(covered, default=float("nan"))),
                        "worst_layer": f"{worst['model']}:{worst['layer']} (n {worst['n']}, "
                        f"rank {worst['rank']})", "over_3pct": sum(x > 1.03 for x in ratios)})
        f32 = [r["f32_ratio"] for r in mine]
        out.append({"model": model, "k": "f32", "layers": len(f32), "median": float(np.median(f32)), "max": float(max(f32)),
                    "median_top": float("nan"), "max_top": float("nan"), "covered": 0, "max_covered": float("nan"),
                    "worst_layer": "", "over_3pct": sum(x > 1.03 for x in f32)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=ALL_MODELS)
    parser.add_argument("--ks", nargs="+", type=int, default=list(KS), help="reduced basis sizes (each < n)")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default: all)")
    parser.add_argument("--layers", action="store_true", help="print every layer's ratios")
    parser.add_argument("--out", type=Path, default=None, help="write reduced_basis.json here")
    args = parser.parse_args(argv)
    from tools.eval_suite import MODELS

    ks = tuple(sorted(args.ks))
    rows, timing = [], {}
    for name in args.models:
        if not MODELS[name].exists():
            print(f"{name}: not fetched (python -m tools.real_models.fetch): skipped")
            continue
        layers, seen, seconds = collect(name, ks, args.samples)
        t0 = time.perf_counter()
        for lay in layers:
            row = {"model": name, **evaluate(lay)}
            rows.append(row)
            if args.layers:
                ratios = " ".join(f"k{k} {v:.3f}/{row['ratio_top'][k]:.3f}" for k, v in row["ratio"].items())
                print(f"  {name} {row['layer']} {row['kind']} n={row['n']} T={row['out']} R={row['rank']}: free "
                      f"{row['data_free']:.4f} full {row['full']:.4f} f32 {row['f32_ratio']:.4f} | {ratios}")
            del lay["fit"], lay["f32"], lay["reduced"], lay["top"]
        timing[name] = {"samples": seen, "collect_s": seconds, "fit_s": time.perf_counter() - t0, "layers": len(layers)}
        print(f"{name}: {len(layers)} layers, {seen} samples, collect {seconds:.1f} s, fits {timing[name]['fit_s']:.1f} s")
    summary = summarize(rows, ks)
    print(f"\n{'model':20s} {'k':>5s} {'layers':>6s} {'median':>7s} {'max':>7s} {'>3%':>4s} {'covered':>7s} {'max':>6s} "
          f"{'top med':>7s} {'top max':>7s}  worst layer")
    for s in summary:
        print(f"{s['model']:20s} {s['k']!s:>5s} {s['layers']:6d} {s['median']:7.3f} {s['max']:7.3f} {s['over_3pct']:4d} "
              f"{s['covered']:7d} {s['max_covered']:6.3f} {s['median_top']:7.3f} {s['max_top']:7.3f}  {s['worst_layer']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "reduced_basis.json"
        path.write_text(json.dumps({"ks": list(ks), "rank_fraction": RANK_FRACTION, "round_to": ROUND_TO,
                                    "timing": timing, "summary": summary, "layers": rows}, indent=1, default=str))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
