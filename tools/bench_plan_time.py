"""Plan time of ``compress --target-speedup`` on a heavy conv model: a VGG16-sized detector.

Builds a detector body like a VGG16-BN text detector's (BN folded): the 13 3x3 convs of VGG16
(64, 64, pool, 128, 128, pool, 256 x3, pool, 512 x3, pool, 512 x3), ReLUs, and a 1x1 conv head
to 2 score maps; random He-initialized weights (speed and plan time only), input
[batch, 3, H, W] (default 480x640: 0.39 s per forward on this 2-core machine, quiet; 736x1280:
1.37 s), and 16 smooth random calibration images. Then runs the CLI ``onnxlr compress --target-speedup X --calib ...`` and
prints the plan time with each phase's seconds (the report's budget.plan_seconds), the damage
estimator used, the load average, and the forward time, as JSON.

    python tools/bench_plan_time.py --height 736 --width 1280 --target 2 --out docs/budget/plan_time_vgg16_detector_1s.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def detector(height: int, width: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, c_in, k = "image", 3, 0
    for v in VGG16:
        if v == "M":
            y = f"pool{k}"
            nodes.append(helper.make_node("MaxPool", [x], [y], kernel_shape=[2, 2], strides=[2, 2]))
            x = y
            continue
        k += 1
        w = (rng.standard_normal((v, c_in, 3, 3)) * np.sqrt(2.0 / (c_in * 9))).astype(np.float32)
        b = (rng.standard_normal(v) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{k}.w"), numpy_helper.from_array(b, f"conv{k}.b")]
        nodes.append(helper.make_node("Conv", [x, f"conv{k}.w", f"conv{k}.b"], [f"conv{k}"], pads=[1, 1, 1, 1],
                                      kernel_shape=[3, 3]))
        nodes.append(helper.make_node("Relu", [f"conv{k}"], [f"relu{k}"]))
        x, c_in = f"relu{k}", v
    w = (rng.standard_normal((2, c_in, 1, 1)) * np.sqrt(1.0 / c_in)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "head.w"))
    nodes.append(helper.make_node("Conv", [x, "head.w"], ["scores"]))
    graph = helper.make_graph(
        nodes, "vgg16_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, height, width])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2, height // 16, width // 16])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def images(n: int, height: int, width: int, seed: int = 1) -> np.ndarray:
    """Smooth random images (low-frequency noise, upsampled), normalized like ImageNet inputs."""
    rng = np.random.default_rng(seed)
    small = rng.standard_normal((n, 3, height // 16 + 1, width // 16 + 1)).astype(np.float32)
    big = small.repeat(16, axis=2).repeat(16, axis=3)[:, :, :height, :width]
    return big + 0.3 * rng.standard_normal((n, 3, height, width)).astype(np.float32)


def forward_ms(path: Path, x: np.ndarray, threads: int | None) -> float:
    from onnxlr import runtime

    s = runtime.make_session(str(path), threads=threads)
    feed = {"image": x[:1]}
    s.run(None, feed)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--target", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plan-time", type=float, default=None, help="passed to compress --plan-time")
    p.add_argument("--damage", default=None, help="passed to compress --damage")
    p.add_argument("--work", type=Path, default=Path(".cache/bench_plan_time"))
    p.add_argument("--cache-dir", type=Path, default=None, help="latency cache (default: a fresh one in --work)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model_path, calib_path = args.work / "detector.onnx", args.work / "calib.npz"
    onnx.save(detector(args.height, args.width), model_path)
    x = images(args.samples, args.height, args.width)
    np.savez(calib_path, image=x)
    fwd = forward_ms(model_path, x, args.threads)
    cache = args.cache_dir or args.work / f"latency-{int(time.time())}"
    report = args.work / "report.json"
    cmd = [sys.executable, "-m", "onnxlr", "compress", str(model_path), "-o", str(args.work / "out.onnx"),
           "--target-speedup", f"{args.target:g}", "--calib", str(calib_path), "--report", str(report),
           "--cache-dir", str(cache)]
    for flag, value in (("--threads", args.threads), ("--plan-time", args.plan_time), ("--damage", args.damage)):
        if value is not None:
            cmd += [flag, str(value)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=ROOT)
    wall = time.perf_counter() - t0
    info = json.loads(report.read_text()).get("budget", {}) if report.exists() else {}
    result = {"input": [1, 3, args.height, args.width], "forward_ms": fwd, "samples": args.samples,
              "target": args.target, "exit": proc.returncode, "wall_s": wall,
              "plan_seconds": info.get("plan_seconds"), "damage": {k: v for k, v in (info.get("damage") or {}).items()
                                                                   if k != "layers"},
              "measured_speedup": info.get("measured_speedup"),
              "p10_p90": [info.get("timing", {}).get("p10"), info.get("timing", {}).get("p90")],
              "measured_error": info.get("measured_error"), "threads": info.get("threads"),
              "chosen": [f"{c['name']} {c['method']} {c['fraction']:g}" for c in info.get("chosen", [])],
              "bounded_timing": {k: info.get("timings", {}).get(k) for k in ("max_timing_area", "bounded_layers")},
              "load_before": load_before, "load_after": os.getloadavg()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
