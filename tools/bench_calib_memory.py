"""Peak memory of calibration: 100 vs 1,000 samples must cost the same (within 20%).

    python tools/bench_calib_memory.py [--out-dir DIR] [--mode asymmetric|symmetric] [--size 96]

Builds a small CNN with a dynamic batch (3x3 convs, 1x1 convs, a Gemm head; random weights, fine
for memory) and two calibration files of 100 and 1,000 samples (the 1,000-sample file is about
110 MB at the default size), then runs ``onnxlr compress --calib`` on each in a fresh process and
reads that process's peak RSS (``ru_maxrss``). Calibration streams the .npz member by member in
chunks and keeps only O(n^2) moments per layer, so the peak must not grow with the sample count.
Prints JSON, then a one-line verdict; exit status 1 when the ratio exceeds 1.2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LIMIT = 1.2

CHILD = r"""
import json, resource, sys, time
from onnxlr.pipeline import compress_file
t = time.perf_counter()
_, report = compress_file(sys.argv[1], sys.argv[2], rank="0.5", calib=sys.argv[3], calib_mode=sys.argv[4],
                          overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "notes": report.model_notes}))
"""


def cnn(size: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current, channels = "x", 3

    def conv(out, k, stride=1):
        nonlocal current, channels
        i = len(nodes)
        w = (rng.standard_normal((out, channels, k, k)) / np.sqrt(channels * k * k)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(out, np.float32), f"b{i}")])
        nodes.append(helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        current, channels = f"r{i}", out

    conv(32, 3, 2)
    conv(64, 3)
    conv(128, 1)
    conv(64, 3, 2)
    conv(256, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["g"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["g"], ["f"], name="flatten"))
    fc = (rng.standard_normal((100, channels)) / np.sqrt(channels)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(np.zeros(100, np.float32), "fc_b")]
    nodes.append(helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "calib_memory", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 100])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def write_samples(path: Path, count: int, size: int, seed: int) -> None:
    """Written in blocks through an open .npy member, so this script stays small too."""
    rng = np.random.default_rng(seed)
    import zipfile

    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (count, 3, size, size)}
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive, archive.open("x.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, header)
        for start in range(0, count, 50):
            f.write(rng.standard_normal((min(50, count - start), 3, size, size)).astype(np.float32).tobytes())


def measure(model: Path, data: Path, out: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), str(data), mode],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--mode", default="asymmetric", choices=("asymmetric", "symmetric"))
    parser.add_argument("--size", type=int, default=96, help="input height and width (default: 96)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = work / "cnn.onnx"
        onnx.save(cnn(args.size), model)
        results = {}
        for count in (100, 1000):
            data = work / f"calib_{count}.npz"
            write_samples(data, count, args.size, seed=count)
            result = measure(model, data, work / f"out_{count}.onnx", args.mode)
            result["data_mb"] = round(data.stat().st_size / 2**20, 1)
            results[count] = result
        ratio = results[1000]["peak_rss_mb"] / results[100]["peak_rss_mb"]
    summary = {"mode": args.mode, "size": args.size, "results": results, "peak_ratio_1000_vs_100": round(ratio, 3)}
    print(json.dumps(summary, indent=1))
    verdict = "PASS" if ratio <= LIMIT else "FAIL"
    print(f"{verdict}: peak RSS {results[100]['peak_rss_mb']:.0f} MB with 100 samples, "
          f"{results[1000]['peak_rss_mb']:.0f} MB with 1000 ({ratio:.2f}x, limit {LIMIT}x); "
          f"calibration data {results[100]['data_mb']} MB vs {results[1000]['data_mb']} MB")
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    raise SystemExit(main())
