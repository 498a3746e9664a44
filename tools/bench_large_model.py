"""Peak memory of `onnxlr compress` on a model with external data, by default over 2 GB.

    python tools/bench_large_model.py --size-gb 2.2 --workdir /tmp/onnxlr-big

Builds ``big.onnx`` + ``big.onnx.data``: one input x [batch, K] feeding ``layers`` MatMuls with
random float32 weights [K, N] (tall and thin, so each factorization is a cheap N x N Gram
eigendecomposition), whose outputs are summed into one output. The data file is written tensor by
tensor, so building it needs little memory. Then ``onnxlr compress big.onnx -o small.onnx
--rank 0.5`` runs in a child process; its peak resident memory (ru_maxrss of the child) is
compared with the model's size on disk. The figure to watch is ``ratio`` (peak RSS / model size):
the issue asks for less than 2.5. Both models are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

GB = 1024**3


def build(path: Path, size_bytes: int, rows: int, cols: int, seed: int = 0) -> tuple[int, int]:
    """Write the model and its data file; returns (layers, bytes on disk)."""
    layer_bytes = rows * cols * 4
    layers = max(1, -(-size_bytes // layer_bytes))
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    offset = 0
    with open(path.parent / data_name, "wb") as f:
        for i in range(layers):
            weight = rng.standard_normal((rows, cols), dtype=np.float32)
            f.write(weight.tobytes())
            tensor = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[rows, cols])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(layer_bytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += layer_bytes
            inits.append(tensor)
            nodes.append(helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"], name=f"mm{i}"))
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(layers)], ["y"], name="sum"))
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="purpose", value="onnxlr large-model benchmark")
    path.write_bytes(model.SerializeToString())
    return layers, offset + path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.2, help="model size in GiB (default 2.2)")
    parser.add_argument("--rows", type=int, default=65536, help="K of each [K, N] weight")
    parser.add_argument("--cols", type=int, default=256, help="N of each [K, N] weight")
    parser.add_argument("--rank", default="0.5", help="--rank passed to onnxlr compress")
    parser.add_argument("--workdir", default="/tmp/onnxlr-big", help="where the models go")
    parser.add_argument("--keep", action="store_true", help="keep the models afterwards")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gb * GB)
    free = shutil.disk_usage(work).free
    if free < 2.2 * size:
        print(f"need about {2.2 * size / GB:.1f} GiB free in {work}, have {free / GB:.1f}", file=sys.stderr)
        return 2
    big, small = work / "big.onnx", work / "small.onnx"
    try:
        t0 = time.perf_counter()
        layers, disk = build(big, size, args.rows, args.cols)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "onnxlr", "compress", str(big), "-o", str(small), "--rank", args.rank]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        out_bytes = sum(p.stat().st_size for p in work.iterdir() if p.name.startswith("small.onnx"))
        onnx.checker.check_model(str(small))  # loads from the path: external data allowed
        figures = {
            "layers": layers,
            "weight_shape": [args.rows, args.cols],
            "model_bytes": disk,
            "model_gib": round(disk / GB, 3),
            "output_bytes": out_bytes,
            "peak_rss_bytes": peak,
            "peak_rss_gib": round(peak / GB, 3),
            "ratio": round(peak / disk, 3),
            "compress_seconds": round(elapsed, 1),
            "build_seconds": round(built, 1),
        }
        print(json.dumps(figures, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return 0
    finally:
        if not args.keep:
            for p in work.iterdir():
                if p.name.startswith(("big.onnx", "small.onnx", ".big.onnx", ".small.onnx")):
                    p.unlink()


if __name__ == "__main__":
    raise SystemExit(main())
