"""How fast onnxlr itself factorizes: a VGG-16-shaped model and one big CP.

    python tools/bench_compress.py [--out-dir DIR] [--skip-vgg] [--skip-cp]

1. Builds a VGG-16-shaped ONNX model (13 convs, 3 FC layers, 138 M parameters, random weights:
   fine for timing), then runs `onnxlr compress --method auto --rank 0.33` on it in a fresh
   process, reporting wall time and that process's peak RSS against the model's size.
2. Times CP at rank 128 on one 512x512x3x3 conv layer.

Prints JSON, then a table with wall and CPU seconds (factorization runs on one BLAS thread, so on
an idle machine wall time is close to CPU time; on a shared one it is not). Targets (core issue):
VGG-16 under 60 s with peak memory under 3x the model's size; the CP under 15 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VGG16_CONVS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current, channels = "input", 3

    def weight(name, shape):
        fan_in = int(np.prod(shape[1:]))
        data = (rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in)))
        inits.append(numpy_helper.from_array(data, name))
        return name

    for i, width in enumerate(VGG16_CONVS):
        out = f"t{i}"
        if width == "M":
            nodes.append(helper.make_node("MaxPool", [current], [out], kernel_shape=[2, 2], strides=[2, 2]))
        else:
            w = weight(f"conv{i}.weight", (width, channels, 3, 3))
            b = weight(f"conv{i}.bias", (width,))
            nodes.append(helper.make_node("Conv", [current, w, b], [out + "c"], name=f"conv{i}", pads=[1, 1, 1, 1],
                                          kernel_shape=[3, 3]))
            nodes.append(helper.make_node("Relu", [out + "c"], [out]))
            channels = width
        current = out
    nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1))
    current = "flat"
    for j, (k, n) in enumerate([(25088, 4096), (4096, 4096), (4096, 1000)]):
        w = weight(f"fc{j}.weight", (n, k))  # torch layout: transB=1
        b = weight(f"fc{j}.bias", (n,))
        out = f"fc{j}" if j == 2 else f"fc{j}r"
        nodes.append(helper.make_node("Gemm", [current, w, b], [f"fc{j}o"], name=f"fc{j}", transB=1))
        if j < 2:
            nodes.append(helper.make_node("Relu", [f"fc{j}o"], [out]))
            current = out
        else:
            current = f"fc{j}o"
    graph = helper.make_graph(
        nodes,
        "vgg16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", 1000])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import onnxlr
model, report = onnxlr.compress_file(sys.argv[1], sys.argv[2], method="auto", rank="0.33")
elapsed = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across fork + exec.
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": elapsed, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                  "peak_rss_bytes": hwm_kib * 1024, "totals": report.totals}))
"""


def bench_vgg(out_dir: Path) -> dict:
    src, dst = out_dir / "vgg16.onnx", out_dir / "vgg16_lr.onnx"
    model = vgg16_model()
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    onnx.save(model, src)
    del model
    size = src.stat().st_size
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "case": "VGG-16 compress --method auto --rank 0.33",
        "params": params,
        "model_bytes": size,
        "seconds": round(child["seconds"], 2),
        "cpu_seconds": round(child["cpu_seconds"], 2),
        "peak_rss_bytes": child["peak_rss_bytes"],
        "peak_over_model_size": round(child["peak_rss_bytes"] / size, 2),
        "macs_before": child["totals"]["macs_before"],
        "macs_after": child["totals"]["macs_after"],
        "target": "< 60 s, peak < 3x model size",
    }


def bench_cp() -> dict:
    from onnxlr.layers import ConvLayer
    from onnxlr.methods.cp import cp_chain
    from onnxlr.pipeline import single_threaded_blas

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((512, 512, 3, 3)).astype(np.float32)
    layer = ConvLayer(weight, None, 1, (1, 1), (1, 1), (1, 1, 1, 1))
    t0, c0 = time.perf_counter(), time.process_time()
    with single_threaded_blas():
        replacement = cp_chain(layer, lambda *args: 128)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    error = float(np.linalg.norm(replacement.reconstruction - weight) / np.linalg.norm(weight))
    return {"case": "CP rank 128 on one 512x512x3x3 conv", "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "weight_rel_error": round(error, 4), "target": "< 15 s"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write the VGG-16 models (default: a temp dir)")
    parser.add_argument("--skip-vgg", action="store_true")
    parser.add_argument("--skip-cp", action="store_true")
    args = parser.parse_args()
    results = []
    if not args.skip_cp:
        results.append(bench_cp())
    if not args.skip_vgg:
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = args.out_dir or Path(tmp)
            out_dir.mkdir(parents=True, exist_ok=True)
            results.append(bench_vgg(out_dir))
    print(json.dumps(results, indent=2))
    print()
    print(f"{'case':45} {'wall s':>8} {'CPU s':>8}  {'extra':30} target")
    for r in results:
        extra = (f"peak {r['peak_rss_bytes'] / 2**20:.0f} MiB = {r['peak_over_model_size']}x model"
                 if "peak_rss_bytes" in r else f"weight rel error {r['weight_rel_error']}")
        print(f"{r['case']:45} {r['seconds']:>8} {r['cpu_seconds']:>8}  {extra:30} {r['target']}")


if __name__ == "__main__":
    main()
