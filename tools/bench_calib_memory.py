"""Peak memory of calibration: 100 vs 1,000 samples must cost the same (within 20%); and, with
``--models``, wall time and peak memory of ``--calib`` on three large models (issue 13, must show 1).

    python tools/bench_calib_memory.py [--out-dir DIR] [--mode asymmetric|symmetric] [--size 96]
    python tools/bench_calib_memory.py --models [vgg16,bert,decoder] [--calib-memory 2G] [--json F]

``--models``: (a) the VGG-16-shaped model of tools/bench_compress.py (553 MB) at ``--rank 0.33`` on
64 random samples at 224x224; (b) a BERT-base-shaped encoder built here (12 layers, hidden 768,
FFN 3072, 12 heads, sequence 128, MatMul+Add linears, LayerNormalization, Softmax, Gelu; inputs
input_ids and attention_mask [batch, 128] int64 with an embedding Gather; 437 MB) at ``--rank 0.5``
on 64 samples with random padding; (c) a decoder-shaped MLP stack over 2 GB saved with external
data (x [batch, 32, 2048]; 16 blocks of MatMul 2048->8192, Gelu, MatMul 8192->2048, residual Add,
LayerNormalization) at ``--rank 0.5`` on 16 samples. Each runs ``compress_file(..., calib=...)``
in a fresh process (one at a time), which reports its wall time and VmHWM (its own peak RSS) and
the statistics bound it was given (the report's note). Goal: peak RSS at most 2x the model size
plus 1 GiB, or within the given ``--calib-memory``; VGG-16 in under 10 minutes. The 1-minute load
average before and after each run is printed too (the machine may be shared).

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


# --- --models: large models -----------------------------------------------------------------

GIB = 2**30
MODEL_CHILD = r"""
import json, logging, os, re, sys, time
t = time.perf_counter()
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)9.0f ms %(message)s")
from onnxlr.pipeline import compress_file
options = json.loads(sys.argv[4])
_, report = compress_file(sys.argv[1], sys.argv[2], calib=sys.argv[3], overwrite=True, **options)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
notes = [n for n in report.model_notes if n.startswith("calibrated")]
layers = [r for r in report.layers if r.method]
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_bytes": hwm * 1024, "calib_note": notes[0] if notes else "",
                  "replaced": len(layers), "refined": sum(any(n.startswith("calib: ") and "->" in n for n in r.notes) for r in layers),
                  "data_free": [f"{r.name}: {n}" for r in layers for n in r.notes if "data-free" in n or "too wide" in n]}))
"""


def _external(name: str, array: np.ndarray, f, data_name: str, offset: int) -> tuple[onnx.TensorProto, int]:
    """A tensor referring to ``array``'s bytes, appended to the open data file ``f`` (4 kB aligned)."""
    pad = (-offset) % 4096
    f.write(b"\0" * pad)
    offset += pad
    f.write(array.tobytes())
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor, offset + array.nbytes


def bert_model(layers: int = 12, hidden: int = 768, ffn: int = 3072, heads: int = 12, seq: int = 128,
               vocab: int = 30522, seed: int = 0) -> onnx.ModelProto:
    """A BERT-base-shaped encoder with random weights (opset 20: LayerNormalization, Gelu)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(name, shape, scale=0.02):
        return const(name, (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)))

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def linear(x, name, n_in, n_out):
        y = node("MatMul", [x, weight(f"{name}.weight", (n_in, n_out))], f"{name}.mm")
        return node("Add", [y, weight(f"{name}.bias", (n_out,))], f"{name}.out")

    def layer_norm(x, name):
        return node("LayerNormalization", [x, const(f"{name}.gamma", np.ones(hidden, np.float32)),
                                           const(f"{name}.beta", np.zeros(hidden, np.float32))], f"{name}.out",
                    axis=-1, epsilon=1e-12)

    d = hidden // heads
    emb = node("Gather", [weight("word_embeddings", (vocab, hidden)), "input_ids"], "emb.words")
    emb = node("Add", [emb, weight("position_embeddings", (seq, hidden))], "emb.pos")
    x = layer_norm(emb, "emb.ln")
    mask = node("Cast", ["attention_mask"], "mask.f", to=TensorProto.FLOAT)
    mask = node("Sub", [const("one", np.float32(1.0)), mask], "mask.inv")
    mask = node("Mul", [mask, const("neg", np.float32(-10000.0))], "mask.add")
    mask = node("Unsqueeze", [mask, const("mask.axes", np.array([1, 2], np.int64))], "mask.4d")
    split = const("heads.shape", np.array([0, seq, heads, d], np.int64))
    merge = const("merge.shape", np.array([0, seq, hidden], np.int64))
    scale = const("scale", np.float32(1.0 / np.sqrt(d)))
    for i in range(layers):
        p = f"layer{i}"

        def heads_of(t, perm):
            return node("Transpose", [node("Reshape", [t, split], f"{t}.split")], f"{t}.heads", perm=perm)

        q = heads_of(linear(x, f"{p}.q", hidden, hidden), [0, 2, 1, 3])
        k = heads_of(linear(x, f"{p}.k", hidden, hidden), [0, 2, 3, 1])
        v = heads_of(linear(x, f"{p}.v", hidden, hidden), [0, 2, 1, 3])
        scores = node("Add", [node("Mul", [node("MatMul", [q, k], f"{p}.qk"), scale], f"{p}.scaled"), mask], f"{p}.masked")
        probs = node("Softmax", [scores], f"{p}.probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], f"{p}.ctx")], f"{p}.ctx.t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, merge], f"{p}.ctx.merged")
        x = layer_norm(node("Add", [x, linear(ctx, f"{p}.o", hidden, hidden)], f"{p}.res1"), f"{p}.ln1")
        h = node("Gelu", [linear(x, f"{p}.ffn1", hidden, ffn)], f"{p}.gelu")
        x = layer_norm(node("Add", [x, linear(h, f"{p}.ffn2", ffn, hidden)], f"{p}.res2"), f"{p}.ln2")
    graph = helper.make_graph(
        nodes, "bert_base",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", seq, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


def decoder_model(path: Path, blocks: int = 16, hidden: int = 2048, ffn: int = 8192, seq: int = 32,
                  seed: int = 0) -> None:
    """A decoder-shaped MLP stack with its weights in ``path``.data, written tensor by tensor."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    nodes, inits, offset, x = [], [], 0, "x"
    with open(path.parent / data_name, "wb") as f:
        def weight(name, shape):
            nonlocal offset
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(shape[0]))
            tensor, offset = _external(name, w, f, data_name, offset)
            inits.append(tensor)
            return name

        for i in range(blocks):
            p = f"block{i}"
            nodes.append(helper.make_node("MatMul", [x, weight(f"{p}.up", (hidden, ffn))], [f"{p}.h"], name=f"{p}.up"))
            nodes.append(helper.make_node("Gelu", [f"{p}.h"], [f"{p}.g"], name=f"{p}.gelu"))
            nodes.append(helper.make_node("MatMul", [f"{p}.g", weight(f"{p}.down", (ffn, hidden))], [f"{p}.d"], name=f"{p}.down"))
            nodes.append(helper.make_node("Add", [x, f"{p}.d"], [f"{p}.r"], name=f"{p}.res"))
            inits += [numpy_helper.from_array(np.ones(hidden, np.float32), f"{p}.gamma"),
                      numpy_helper.from_array(np.zeros(hidden, np.float32), f"{p}.beta")]
            nodes.append(helper.make_node("LayerNormalization", [f"{p}.r", f"{p}.gamma", f"{p}.beta"], [f"{p}.out"],
                                          name=f"{p}.ln", axis=-1))
            x = f"{p}.out"
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, hidden])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", seq, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())


def build_case(name: str, work: Path) -> dict:
    """Write the model and its calibration .npz; returns the case's description."""
    rng = np.random.default_rng(1)
    if name == "vgg16":
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_compress import vgg16_model

        model, samples, rank = work / "vgg16.onnx", 64, "0.33"
        onnx.save(vgg16_model(), model)
        np.savez(work / "vgg16_calib.npz", input=rng.standard_normal((samples, 3, 224, 224), dtype=np.float32))
    elif name == "bert":
        model, samples, rank = work / "bert.onnx", 64, "0.5"
        onnx.save(bert_model(), model)
        lengths = rng.integers(16, 129, size=samples)
        mask = (np.arange(128)[None, :] < lengths[:, None]).astype(np.int64)
        ids = rng.integers(1000, 30522, size=(samples, 128)).astype(np.int64) * mask
        np.savez(work / "bert_calib.npz", input_ids=ids, attention_mask=mask)
    elif name == "decoder":
        model, samples, rank = work / "decoder.onnx", 16, "0.5"
        decoder_model(model)
        np.savez(work / "decoder_calib.npz", x=rng.standard_normal((samples, 32, 2048), dtype=np.float32))
    else:
        raise SystemExit(f"unknown model {name!r}: choose from vgg16, bert, decoder")
    size = sum(p.stat().st_size for p in work.iterdir() if p.name in (model.name, model.name + ".data"))
    return {"model": name, "path": model, "calib": work / f"{name}_calib.npz", "samples": samples, "rank": rank,
            "model_bytes": size}


def run_case(case: dict, work: Path, calib_memory: str | None) -> dict:
    import os

    options = {"rank": case["rank"], "method": "auto"}
    if calib_memory:
        options["calib_memory"] = calib_memory
    load_before = os.getloadavg()[0]
    with open(work.parent / f"{case['model']}.log", "w") as log:  # the child's log (INFO), kept
        done = subprocess.run([sys.executable, "-c", MODEL_CHILD, str(case["path"]), str(work / f"{case['model']}_lr.onnx"),
                               str(case["calib"]), json.dumps(options)], stdout=subprocess.PIPE, stderr=log, text=True)
    result = {k: v for k, v in case.items() if k not in ("path", "calib")}
    result.update(rank=case["rank"], load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
    if done.returncode != 0:
        lines = (work.parent / f"{case['model']}.log").read_text().strip().splitlines()
        result.update(error=(lines or ["?"])[-1][:300], met=False)
        return result
    child = json.loads(done.stdout.strip().splitlines()[-1])
    import re

    match = re.search(r"statistics bound ([\d.]+ [kMG]?B)", child["calib_note"])
    result.update(child, seconds=round(child["seconds"], 1), bound=match.group(1) if match else "?",
                  bound_given=calib_memory or "default (half the available memory)")
    goal = 2 * case["model_bytes"] + GIB
    if calib_memory:
        from onnxlr.config import parse_size

        goal = max(goal, parse_size(calib_memory, "--calib-memory"))
    result["goal_bytes"] = goal
    result["met"] = child["peak_rss_bytes"] <= goal and (case["model"] != "vgg16" or child["seconds"] < 600)
    return result


def main_models(names: list[str], out_dir: Path | None, calib_memory: str | None, json_path: Path | None) -> int:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            work = (out_dir or Path(tmp)) / name
            work.mkdir(parents=True, exist_ok=True)
            case = build_case(name, work)
            results.append(run_case(case, work, calib_memory))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            for p in work.iterdir():
                p.unlink()
    print(json.dumps(results, indent=1))
    if json_path:
        json_path.write_text(json.dumps(results, indent=1))
    print(f"\n{'model':8} {'size':>8} {'samples':>7} {'bound':>9} {'wall s':>7} {'peak RSS':>9} {'goal':>9} {'load':>9}  met")
    for r in results:
        peak = f"{r['peak_rss_bytes'] / GIB:.2f} GiB" if "peak_rss_bytes" in r else "error"
        goal = f"{r['goal_bytes'] / GIB:.2f} GiB" if "goal_bytes" in r else ""
        print(f"{r['model']:8} {r['model_bytes'] / GIB:>4.2f} GiB {r['samples']:>7} {r.get('bound', '-'):>9} "
              f"{r.get('seconds', '-'):>7} {peak:>9} {goal:>9} {r['load_before']:>4}/{r['load_after']:<4}  "
              f"{'yes' if r['met'] else 'NO'}{'  ' + r['error'] if 'error' in r else ''}")
    return 0 if all(r["met"] for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--mode", default="asymmetric", choices=("asymmetric", "symmetric"))
    parser.add_argument("--size", type=int, default=96, help="input height and width (default: 96)")
    parser.add_argument("--models", nargs="?", const="vgg16,bert,decoder", default=None,
                        help="instead: calibrate these large models (default all: vgg16,bert,decoder)")
    parser.add_argument("--calib-memory", default=None, help="with --models: the --calib-memory to give")
    parser.add_argument("--json", type=Path, default=None, help="with --models: also write the results here")
    args = parser.parse_args()
    if args.models:
        return main_models(args.models.split(","), args.out_dir, args.calib_memory, args.json)
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
