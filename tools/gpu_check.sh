#!/usr/bin/env bash
# The GPU check of issue #4: verify and benchmark compressed models on onnxruntime's CUDA
# execution provider (and TensorRT, where its libraries are present), in one run.
#
#   bash tools/gpu_check.sh WORK_DIR [EXTRA_MODEL.onnx ...]
#
# Needs onnxruntime-gpu importable with its CUDA and cuDNN libraries (pip's nvidia-* packages or
# LD_LIBRARY_PATH) and onnxlr importable (pip install -e . or PYTHONPATH=.). Every step prints
# its table; JSON results land in WORK_DIR. A failing step is reported and the next one runs.
set -u
work=${1:?usage: tools/gpu_check.sh WORK_DIR [EXTRA_MODEL.onnx ...]}
shift
mkdir -p "$work"
py=${PYTHON:-python3}
prov=${PROVIDER:-cuda}  # PROVIDER=cpu runs the same steps on a machine without a GPU
onnxlr() { "$py" -m onnxlr "$@"; echo "[exit $?]"; }
step() { printf '\n=== %s\n' "$*"; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" -c 'import onnxruntime as o, onnx, numpy; print("onnxruntime", o.__version__, o.get_available_providers(), "| onnx", onnx.__version__, "| numpy", numpy.__version__)'
nproc

m=models/digits_vgg.onnx
step "bundled model: compress on the CPU (the README quick start, without its CPU check)"
onnxlr compress $m -o "$work/digits_lr.onnx" --rank 0.375 --include Conv \
    --calib models/digits_vgg_calib.npz --report "$work/digits_lr.report.json"
onnxlr compress $m -o "$work/digits_full.onnx" --rank 1.0 --force

step "verify on CUDA, held-out digits: compressed, then full rank (exactness on the GPU)"
onnxlr verify $m "$work/digits_lr.onnx" --provider $prov --inputs models/digits_vgg_test.npz \
    --max-rel-error none --min-top1 0.98 --per-layer --json "$work/verify_cuda_lr.json"
onnxlr verify $m "$work/digits_full.onnx" --provider $prov --inputs models/digits_vgg_test.npz \
    --max-rel-error 1e-4 --json "$work/verify_cuda_full.json"
step "bench on CUDA: a model against itself, then original vs compressed at batch 1 and 64"
onnxlr bench $m $m --provider $prov --runs 300 --json "$work/bench_cuda_self.json"
for b in 1 64; do
    onnxlr bench $m "$work/digits_lr.onnx" --provider $prov --runs 300 --batch $b \
        --json "$work/bench_cuda_b$b.json"
done
step "bench on CUDA with host<->device copies timed (batch 1)"
onnxlr bench $m "$work/digits_lr.onnx" --provider $prov --runs 300 --host-io \
    --json "$work/bench_cuda_b1_hostio.json"

for x in "$@"; do
    name=$(basename "$x" .onnx)
    step "$x: compress (data-free, auto 0.5 and full rank), verify and bench on CUDA"
    onnxlr compress "$x" -o "$work/${name}_lr.onnx" --rank 0.5
    onnxlr compress "$x" -o "$work/${name}_full.onnx" --rank 1.0 --force
    onnxlr verify "$x" "$work/${name}_full.onnx" --provider $prov --max-rel-error 1e-4 --samples 8 \
        --json "$work/verify_cuda_${name}_full.json"
    onnxlr verify "$x" "$work/${name}_lr.onnx" --provider $prov --max-rel-error none --samples 8
    for b in 1 16; do
        onnxlr bench "$x" "$work/${name}_lr.onnx" --provider $prov --runs 200 --batch $b \
            --json "$work/bench_cuda_${name}_b$b.json"
    done
done

step "TensorRT provider (needs libnvinfer; a clear error is expected where it is missing)"
onnxlr verify $m "$work/digits_lr.onnx" --provider tensorrt --inputs models/digits_vgg_test.npz \
    --max-rel-error none --min-top1 0.98
onnxlr bench $m "$work/digits_lr.onnx" --provider tensorrt --runs 100

step "budget with per-layer latencies measured on CUDA: --target-speedup 1.2 --provider $prov"
ONNXLR_CACHE_DIR="$work/cache" onnxlr compress $m -o "$work/digits_budget_cuda.onnx" \
    --target-speedup 1.2 --provider $prov --calib models/digits_vgg_calib.npz \
    --report "$work/digits_budget_cuda.report.json"
[ -f "$work/digits_budget_cuda.onnx" ] &&
    onnxlr bench $m "$work/digits_budget_cuda.onnx" --provider $prov --runs 300

step "same two on the CPU provider, for comparison"
onnxlr verify $m "$work/digits_lr.onnx" --inputs models/digits_vgg_test.npz \
    --max-rel-error none --min-top1 0.98
onnxlr verify $m "$work/digits_full.onnx" --inputs models/digits_vgg_test.npz --max-rel-error 1e-4

