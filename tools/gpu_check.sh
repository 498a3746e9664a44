#!/usr/bin/env bash
# The GPU check of issues #4 and #15: verify and benchmark compressed (and int8) models on onnxruntime's CUDA
# execution provider (and TensorRT, where its libraries are present), in one run.
#
#   bash tools/gpu_check.sh WORK_DIR [EXTRA_MODEL.onnx ...]
#
# Needs onnxruntime-gpu importable with its CUDA and cuDNN libraries (pip's nvidia-* packages or
# LD_LIBRARY_PATH) and onnxlr importable (pip install -e . or PYTHONPATH=.). Every step prints
# its table; JSON results land in WORK_DIR. A failing step is reported and the next one runs.
#
# Environment:
#   PROVIDER=cpu      run the same steps on a machine without a GPU (TF32 options are skipped)
#   ORT_PARTS=DIR     unpack onnxruntime-gpu from DIR/ort.tar.xz.* (tools/gpu_carry.py) into
#                     /tmp/ort-site first and put it, and the nvidia-* pip libraries, on the paths
#   FULL=0            skip the steps already measured on 2026-11-27 (bench against itself,
#                     --host-io, the budget on CUDA, per-layer verify); default 1: run everything
#   RUNS=N            timed rounds of each bench (default 300)
set -u
work=${1:?usage: tools/gpu_check.sh WORK_DIR [EXTRA_MODEL.onnx ...]}
shift
mkdir -p "$work"
py=${PYTHON:-python3}
prov=${PROVIDER:-cuda}  # PROVIDER=cpu runs the same steps on a machine without a GPU
full=${FULL:-1}
runs=${RUNS:-300}  # timed rounds of each bench
onnxlr() { "$py" -m onnxlr "$@"; echo "[exit $?]"; }
step() { printf '\n=== %s (%ds)\n' "$*" "$SECONDS"; }
# --provider-option use_tf32=0|1 on a GPU provider; nothing on the CPU (which refuses options)
tf32() { [ "$prov" = cpu ] || echo "--provider-option use_tf32=$1"; }

if [ -n "${ORT_PARTS:-}" ]; then
    mkdir -p /tmp/ort-site
    cat "$ORT_PARTS"/ort.tar.xz.* | tar -xJ -C /tmp/ort-site || echo "unpacking $ORT_PARTS failed"
    export PYTHONPATH=$PWD:/tmp/ort-site${PYTHONPATH:+:$PYTHONPATH}
    nv=$("$py" -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null)
    [ -n "$nv" ] && export LD_LIBRARY_PATH=$(find "$nv" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c 'import onnxruntime as o, onnx, numpy, sys; print("python", sys.version.split()[0], "| onnxruntime", o.__version__, o.__file__, o.get_available_providers(), "| onnx", onnx.__version__, "| numpy", numpy.__version__)'
nproc

m=models/digits_vgg.onnx
step "bundled model: compress on the CPU (the README quick start, without its CPU check)"
onnxlr compress $m -o "$work/digits_lr.onnx" --rank 0.375 --include Conv \
    --calib models/digits_vgg_calib.npz --report "$work/digits_lr.report.json"
onnxlr compress $m -o "$work/digits_full.onnx" --rank 1.0 --force

step "bundled model + int8 (issue 15): compress --quantize int8 on the CPU, --verify on $prov (each step, one interleaved bench)"
onnxlr compress $m -o "$work/digits_lr_int8.onnx" --rank 0.375 --include Conv \
    --calib models/digits_vgg_calib.npz --quantize int8 --report "$work/digits_lr_int8.report.json" \
    --verify --provider $prov --inputs models/digits_vgg_test.npz --max-rel-error none --min-top1 0.98 \
    --bench-runs $runs
step "int8 original (onnxlr.quant, the same config and calibration)"
"$py" -c 'import sys
from onnxlr import model as g
from onnxlr.quant import QuantizeConfig, quantize_on
q, r = quantize_on(g.load_model(sys.argv[1]), QuantizeConfig(), sys.argv[2], None)
g.save_model_atomic(q, sys.argv[3]); print("\n".join(r.lines())); print("wrote", sys.argv[3])' \
    $m models/digits_vgg_calib.npz "$work/digits_int8.onnx"; echo "[exit $?]"

step "where the nodes of each model ran on $prov (onnxruntime profile of one run: op type, provider)"
"$py" - "$prov" $m "$work/digits_lr.onnx" "$work/digits_lr_int8.onnx" "$work/digits_int8.onnx" <<'PY'
import collections, json, os, sys
import numpy as np
import onnxruntime as ort
from onnxlr import runtime
prov, paths = sys.argv[1], sys.argv[2:]
for path in paths:
    if not os.path.exists(path):
        print(path, "missing"); continue
    providers = runtime.resolve_provider(prov)
    if prov != "cpu":
        runtime.preload_gpu_libraries()
    opts = runtime.session_options()
    opts.enable_profiling = True
    opts.profile_file_prefix = "/tmp/onnxlr_prof"
    s = ort.InferenceSession(path, opts, providers=providers)
    feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in s.get_inputs()}
    s.run(None, feed)
    events = json.load(open(s.end_profiling()))
    count = collections.Counter((e["args"].get("op_name"), e["args"].get("provider")) for e in events
                                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
    print(f"{path}: " + ", ".join(f"{op}@{p.replace('ExecutionProvider', '')} x{n}" for (op, p), n in sorted(count.items())))
PY
echo "[exit $?]"

step "verify on $prov, held-out digits: factorized int8, int8 original, factorized fp32 vs the fp32 original"
for name in digits_lr_int8 digits_int8 digits_lr; do
    onnxlr verify $m "$work/$name.onnx" --provider $prov --inputs models/digits_vgg_test.npz \
        --max-rel-error none --min-top1 0.98 --json "$work/verify_${prov}_$name.json"
done
step "bench on $prov: fp32 original, factorized fp32, factorized int8, int8 original at batch 1 and 64"
for b in 1 64; do
    onnxlr bench $m "$work/digits_lr.onnx" "$work/digits_lr_int8.onnx" "$work/digits_int8.onnx" \
        --provider $prov --runs $runs --batch $b --json "$work/bench_${prov}_int8_b$b.json"
done

step "full-rank agreement on $prov with TF32 on, then off (use_tf32; both models run on $prov)"
if [ "$prov" != cpu ]; then
    "$py" -c 'from onnxlr import runtime as r
for v in ("1", "0"):
    s = r.make_session("models/digits_vgg.onnx", providers=r.resolve_provider("'$prov'", {"use_tf32": v}))
    print("asked use_tf32=" + v, "-> session:", s.get_provider_options()["CUDAExecutionProvider"]["use_tf32"])'
fi
for t in 1 0; do
    echo "--- use_tf32=$t"
    onnxlr verify $m "$work/digits_full.onnx" --provider $prov $(tf32 $t) --inputs models/digits_vgg_test.npz \
        --max-rel-error 1e-4 --json "$work/verify_${prov}_full_tf32_$t.json"
    onnxlr verify $m "$work/digits_lr.onnx" --provider $prov $(tf32 $t) --inputs models/digits_vgg_test.npz \
        --max-rel-error none --json "$work/verify_${prov}_lr_tf32_$t.json"
    onnxlr bench $m "$work/digits_lr.onnx" --provider $prov $(tf32 $t) --runs $runs --batch 64 \
        --json "$work/bench_${prov}_b64_tf32_$t.json"
done

if [ "$full" = 1 ]; then
step "verify on CUDA, held-out digits: compressed, then full rank (exactness on the GPU)"
onnxlr verify $m "$work/digits_lr.onnx" --provider $prov --inputs models/digits_vgg_test.npz \
    --max-rel-error none --min-top1 0.98 --per-layer --json "$work/verify_cuda_lr.json"
onnxlr verify $m "$work/digits_full.onnx" --provider $prov --inputs models/digits_vgg_test.npz \
    --max-rel-error 1e-4 --json "$work/verify_cuda_full.json"
step "bench on CUDA: a model against itself, then original vs compressed at batch 1 and 64"
onnxlr bench $m $m --provider $prov --runs $runs --json "$work/bench_cuda_self.json"
for b in 1 64; do
    onnxlr bench $m "$work/digits_lr.onnx" --provider $prov --runs $runs --batch $b \
        --json "$work/bench_cuda_b$b.json"
done
step "bench on CUDA with host<->device copies timed (batch 1)"
onnxlr bench $m "$work/digits_lr.onnx" --provider $prov --runs $runs --host-io \
    --json "$work/bench_cuda_b1_hostio.json"
fi

for x in "$@"; do
    name=$(basename "$x" .onnx)
    step "$x: compress (data-free, auto 0.5 and full rank), verify and bench on CUDA"
    onnxlr compress "$x" -o "$work/${name}_lr.onnx" --rank 0.5
    onnxlr compress "$x" -o "$work/${name}_full.onnx" --rank 1.0 --force
    for t in 1 0; do
        echo "--- use_tf32=$t"
        onnxlr verify "$x" "$work/${name}_full.onnx" --provider $prov $(tf32 $t) --max-rel-error 1e-4 \
            --samples 8 --json "$work/verify_${prov}_${name}_full_tf32_$t.json"
    done
    onnxlr verify "$x" "$work/${name}_lr.onnx" --provider $prov --max-rel-error none --samples 8
    for b in 1 16; do
        onnxlr bench "$x" "$work/${name}_lr.onnx" --provider $prov --runs 200 --batch $b \
            --json "$work/bench_cuda_${name}_b$b.json"
    done
done

step "TensorRT provider on the int8 model (needs libnvinfer; a clear error is expected where it is missing)"
echo "libnvinfer on this machine: $( (ldconfig -p | grep -o 'libnvinfer[^ ]*'; find /usr /opt -name 'libnvinfer*.so*' 2>/dev/null) | sort -u | paste -sd' ')"
"$py" -c 'import tensorrt; print("python tensorrt", tensorrt.__version__)' 2>&1 | tail -1
onnxlr verify $m "$work/digits_lr_int8.onnx" --provider tensorrt --inputs models/digits_vgg_test.npz \
    --max-rel-error none --min-top1 0.98
onnxlr bench $m "$work/digits_lr_int8.onnx" --provider tensorrt --runs 100

if [ "$full" = 1 ]; then

step "budget with per-layer latencies measured on CUDA: --target-speedup 1.2 --provider $prov"
ONNXLR_CACHE_DIR="$work/cache" onnxlr compress $m -o "$work/digits_budget_cuda.onnx" \
    --target-speedup 1.2 --provider $prov --calib models/digits_vgg_calib.npz \
    --report "$work/digits_budget_cuda.report.json"
[ -f "$work/digits_budget_cuda.onnx" ] &&
    onnxlr bench $m "$work/digits_budget_cuda.onnx" --provider $prov --runs $runs

fi

step "on the CPU provider, for comparison: factorized fp32, factorized int8, full rank"
onnxlr verify $m "$work/digits_lr.onnx" --inputs models/digits_vgg_test.npz \
    --max-rel-error none --min-top1 0.98
onnxlr verify $m "$work/digits_lr_int8.onnx" --inputs models/digits_vgg_test.npz \
    --max-rel-error none --min-top1 0.98
onnxlr verify $m "$work/digits_full.onnx" --inputs models/digits_vgg_test.npz --max-rel-error 1e-4
step done

