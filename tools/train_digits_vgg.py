"""Train the bundled demo model: a small VGG-style CNN on scikit-learn's digits.

The model is deliberately over-parameterized (64-64-128-128-256-256 3x3 convs on 56x56 inputs,
a fourth 2x2 max-pool, then 2304 -> 256 -> 10), the regime where low-rank factorization pays off.
Weight decay pushes the weight spectra to decay, so Tucker-2 / SVD truncation loses little.

Outputs (under --out-dir, default ``models/``):

    digits_vgg.onnx        opset 17, input ``input`` [batch,1,R,R], output ``logits`` [batch,10]
    digits_vgg_test.npz    held-out test split: ``input`` float32 [N,1,R,R], ``labels`` int64 [N]
    digits_vgg_calib.npz   disjoint calibration split, same form (for data-aware compression)
    digits_vgg.md          model card: architecture, data, accuracy, latency, truncation check

PyTorch and scikit-learn are tool-only dependencies (``pip install .[tools]``); the onnxlr
package never imports them. Run from the repository root::

    python tools/train_digits_vgg.py --out-dir models --epochs 15 --seed 0 --lr 0.05 \
        --weight-decay 0.0005 --resolution 56 --nuclear-weight 0.1 --device cuda

R is ``--resolution`` (default 56). ``--nuclear-weight L`` adds a scale-free nuclear-norm penalty
(low multilinear rank of each conv's two channel modes, low rank of the first FC) to make
data-free truncation lossless-er; ``--init-onnx PATH --no-batchnorm`` starts from an exported
model (penalized fine-tuning). ``--device cuda`` trains on a GPU (seconds instead of an hour on
2 CPU cores); ``--evaluate-onnx PATH`` then writes the exported model, the splits and the card
(accuracy, CPU latency, truncation check) on the machine that will serve it: the bundled model
was made that way, see its card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

log = logging.getLogger("train_digits_vgg")

RESOLUTION = 56  # default of --resolution: about 5-7 ms batch-1 in ORT on 2 cores
CONV_WIDTHS = ((64, 64), (128, 128), (256, 256))  # one tuple per stage, 2x2 max-pool after each
HEAD_POOLS = 1  # extra 2x2 max-pools before the flatten (keep the first FC, and models/, small)
HIDDEN = 256
NUM_CLASSES = 10
TEST_FRACTION = 0.30
CALIB_FRACTION = 0.10
MAX_SHIFT_PX = 2


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Splits:
    """Preprocessed images ([N,1,H,W] float32, exactly the model input) and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float
    std: float


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize [N,8,8] images in [0,16] to [N,1,size,size] in [0,1]."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).numpy()


def load_splits(seed: int, size: int = RESOLUTION) -> Splits:
    """Stratified, disjoint train / calibration / test splits; normalized with train statistics."""
    digits = load_digits()
    images, labels = digits.images, digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=TEST_FRACTION, random_state=seed, stratify=labels)
    calib_share = CALIB_FRACTION / (1.0 - TEST_FRACTION)
    train, calib = train_test_split(
        rest, test_size=calib_share, random_state=seed, stratify=labels[rest]
    )
    assert not (set(train) & set(calib) or set(train) & set(test) or set(calib) & set(test))
    x = upsample(images, size)
    mean, std = float(x[train].mean()), float(x[train].std())
    x = ((x - mean) / std).astype(np.float32)
    return Splits(
        x[train], labels[train], x[calib], labels[calib], x[test], labels[test], mean, std
    )


def random_shift(x: torch.Tensor, max_px: int, background: float) -> torch.Tensor:
    """Translate each image by an integer number of pixels in [-max_px, max_px] per axis."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_px,) * 4, value=background)
    dy = torch.randint(0, 2 * max_px + 1, (n,))
    dx = torch.randint(0, 2 * max_px + 1, (n,))
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(
        n, 1, h, w + 2 * max_px
    )
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return torch.gather(out, 3, cols)


# ----------------------------------------------------------------------------- model


def build_model(batchnorm: bool = True, size: int = RESOLUTION) -> nn.Sequential:
    """VGG-style: [conv3x3(-BN)-ReLU x2, maxpool] x3, maxpool, flatten, FC-ReLU-dropout, FC.

    BatchNorm (folded before export) is the default and gives the bundled model. Without it
    (Kaiming init, conv bias) the model trains as accurately but, in our one try (lr 0.02,
    weight decay 1e-3, 12 epochs), truncated far worse (48% vs 81% at half ranks).
    """
    layers: list[nn.Module] = []
    c_in = 1
    for stage in CONV_WIDTHS:
        for c_out in stage:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)
            if not batchnorm:
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
            layers += [conv, nn.BatchNorm2d(c_out)] if batchnorm else [conv]
            layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        layers.append(nn.MaxPool2d(2))
    layers += [nn.MaxPool2d(2) for _ in range(HEAD_POOLS)]
    spatial = size // 2 ** (len(CONV_WIDTHS) + HEAD_POOLS)
    layers += [
        nn.Flatten(),
        nn.Linear(c_in * spatial * spatial, HIDDEN),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(HIDDEN, NUM_CLASSES),
    ]
    return nn.Sequential(*layers)


def load_onnx_weights(model: nn.Sequential, path: Path) -> None:
    """Initialize a --no-batchnorm model from an exported (BatchNorm-folded) digits_vgg.onnx:
    the Conv / Gemm initializers in graph order map onto the Conv2d / Linear modules in order."""
    m = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm")]
    mods = [x for x in model if isinstance(x, (nn.Conv2d, nn.Linear))]
    if len(nodes) != len(mods):
        raise ValueError(f"{path}: {len(nodes)} Conv/Gemm nodes, model has {len(mods)} layers")
    with torch.no_grad():
        for node, mod in zip(nodes, mods):
            w = torch.from_numpy(inits[node.input[1]].copy())
            if w.shape != mod.weight.shape:
                raise ValueError(
                    f"{node.name}: weight {tuple(w.shape)} != {tuple(mod.weight.shape)}"
                )
            mod.weight.copy_(w)
            mod.bias.copy_(torch.from_numpy(inits[node.input[2]].copy()))


def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """Return an eval-mode copy with every Conv2d+BatchNorm2d pair folded into one biased Conv2d."""
    model = model.eval()
    folded: list[nn.Module] = []
    modules = list(model)
    i = 0
    while i < len(modules):
        m = modules[i]
        if (
            isinstance(m, nn.Conv2d)
            and i + 1 < len(modules)
            and isinstance(modules[i + 1], nn.BatchNorm2d)
        ):
            folded.append(torch.nn.utils.fusion.fuse_conv_bn_eval(m, modules[i + 1]))
            i += 2
            continue
        if not isinstance(m, nn.Dropout):
            folded.append(m)
        i += 1
    return nn.Sequential(*folded).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, size: int = RESOLUTION) -> dict[str, int]:
    """Multiply-accumulates per image for each Conv2d / Linear, keyed by module index."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def fn(mod: nn.Module, _inp, out: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                macs[name] = out[0].numel() * k
            else:
                macs[name] = mod.in_features * mod.out_features

        return fn

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, size, size))
    for h in handles:
        h.remove()
    return macs


# ----------------------------------------------------------------------------- training


def effective_weights(model: nn.Sequential) -> list[tuple[str, torch.Tensor]]:
    """The weights the exported graph will hold: conv weights scaled by their BatchNorm (the
    per-output-channel factor gamma / sqrt(running_var + eps), running statistics detached), for
    every conv with more than one input channel, and the first (largest) Linear weight."""
    out: list[tuple[str, torch.Tensor]] = []
    modules = list(model)
    for i, m in enumerate(modules):
        if isinstance(m, nn.Conv2d) and m.in_channels > 1:
            w = m.weight
            nxt = modules[i + 1] if i + 1 < len(modules) else None
            if isinstance(nxt, nn.BatchNorm2d):
                scale = nxt.weight / torch.sqrt(nxt.running_var.detach() + nxt.eps)
                w = w * scale[:, None, None, None]
            out.append((str(i), w))
    first_fc = next(m for m in modules if isinstance(m, nn.Linear))
    out.append((str(modules.index(first_fc)), first_fc.weight))
    return out


def nuclear_penalty(model: nn.Sequential) -> torch.Tensor:
    """Scale-free low-multilinear-rank penalty ("singular value sparsification").

    For each conv weight W [T,S,k,k] (c_in > 1, BatchNorm folded in): ||W_(0)||_* / ||W||_F +
    ||W_(1)||_* / ||W||_F, with W_(0) the T x (S*k*k) and W_(1) the S x (T*k*k) unfoldings (the two
    channel modes Tucker-2 truncates); for the first Linear weight: ||W||_* / ||W||_F. The
    ratio lies in [1, sqrt(rank)] and is invariant to the layer's scale.
    """
    total = None
    for _, w in effective_weights(model):
        # ||A||_* / ||W||_F = sum_i sqrt(eig_i(A A^T / ||W||_F^2)); eigvalsh of the small Gram
        # matrix (<= 256 x 256) is much cheaper on CPU than an SVD of the wide unfolding.
        fro2 = (w * w).sum() + 1e-12
        if w.dim() == 4:
            t, s = w.shape[:2]
            mats = [w.reshape(t, -1), w.transpose(0, 1).reshape(s, -1)]
        else:
            mats = [w]
        for a in mats:
            eig = torch.linalg.eigvalsh((a @ a.T) / fro2)
            term = eig.clamp_min(1e-8).sqrt().sum()
            total = term if total is None else total + term
    return total


def train(
    model: nn.Module,
    splits: Splits,
    epochs: int,
    seed: int,
    lr: float,
    weight_decay: float,
    batch_size: int = 64,
    nuclear_weight: float = 0.0,
    device: str = "cpu",
) -> float:
    """SGD + Nesterov momentum with one-cycle LR and label smoothing; returns seconds spent."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(splits.x_train)
    y = torch.from_numpy(splits.y_train)
    background = -splits.mean / splits.std
    steps = math.ceil(len(y) / batch_size)
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.2
    )
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for s in range(steps):
            b = perm[s * batch_size : (s + 1) * batch_size]
            xb = random_shift(x[b], MAX_SHIFT_PX, background).to(device)
            loss = F.cross_entropy(model(xb), y[b].to(device), label_smoothing=0.1)
            if nuclear_weight > 0:
                loss = loss + nuclear_weight * nuclear_penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        acc = torch_accuracy(model, splits.x_calib, splits.y_calib)
        with torch.no_grad():
            pen = float(nuclear_penalty(model))
        log.info(
            "epoch %2d/%d  loss %.4f  nuclear %.2f  calib acc %.4f  (%.0fs)",
            epoch + 1,
            epochs,
            total / len(y),
            pen,
            acc,
            time.perf_counter() - t0,
        )
    return time.perf_counter() - t0


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    device = next(model.parameters()).device
    pred = model(torch.from_numpy(x).to(device)).argmax(1).cpu().numpy()
    return float((pred == y).mean())


# ----------------------------------------------------------------------------- export / ORT


TRAINING_KEY = "digits_vgg.training"  # metadata_props entry: JSON of how the model was trained


def export_onnx(
    model: nn.Module, path: Path, size: int = RESOLUTION, training: dict | None = None
) -> None:
    """Export opset 17 with a dynamic batch; ``training`` (command, arguments, seconds, device,
    torch version) is stored as JSON in the model's metadata_props so that ``--evaluate-onnx``
    can write the card of a model trained elsewhere (on a GPU, say)."""
    dummy = torch.zeros(1, 1, size, size)
    torch.onnx.export(
        model,
        dummy,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    m = onnx.load(str(path))
    if training is not None:
        onnx.helper.set_model_props(m, {TRAINING_KEY: json.dumps(training, sort_keys=True)})
        onnx.save(m, str(path))
    onnx.checker.check_model(m, full_check=True)


def read_training(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    if TRAINING_KEY not in props:
        raise SystemExit(f"{path}: no {TRAINING_KEY} metadata (not exported by this script)")
    return json.loads(props[TRAINING_KEY])


def ort_session(model: onnx.ModelProto | str | Path, threads: int = 2) -> ort.InferenceSession:
    """CPU session with default graph optimization and ``threads`` intra-op threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def ort_accuracy(model: onnx.ModelProto | str | Path, x: np.ndarray, y: np.ndarray) -> float:
    logits = ort_session(model).run(["logits"], {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def ort_latency_ms(
    path: Path, size: int = RESOLUTION, runs: int = 100, warmup: int = 10
) -> tuple[float, float, float]:
    """Median and 10th-percentile batch-1 latency in milliseconds, and the 1-minute load average
    when the timing ended (the machine may be shared: the card says how loaded it was)."""
    sess = ort_session(path)
    x = np.zeros((1, 1, size, size), np.float32)
    for _ in range(warmup):
        sess.run(None, {"input": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"input": x})
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 10)), os.getloadavg()[0]


# ----------------------------------------------------------------------------- truncation check


def round_up(x: float, multiple: int = 8) -> int:
    return int(math.ceil(x / multiple) * multiple)


def tucker2_reconstruct(w: np.ndarray, r_out: int, r_in: int) -> np.ndarray:
    """HOSVD on the output and input channel modes: W ~ U_o U_o^T x_0 W x_1 U_i U_i^T."""
    c_out, c_in = w.shape[:2]
    u_o = np.linalg.svd(w.reshape(c_out, -1), full_matrices=False)[0][:, :r_out]
    u_i = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(c_in, -1), full_matrices=False)[0]
    u_i = u_i[:, :r_in]
    core = np.einsum("oihw,or,is->rshw", w, u_o, u_i, optimize=True)
    return np.einsum("rshw,or,is->oihw", core, u_o, u_i, optimize=True).astype(w.dtype)


def svd_reconstruct(w: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vt[:rank]).astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class TruncationResult:
    conv_fraction: float
    fc_fraction: float
    conv_macs: int
    conv_macs_original: int
    accuracy: float
    ranks: list[tuple[str, int, int]]


def truncate_model(
    model: onnx.ModelProto, conv_fraction: float, fc_fraction: float, size: int = RESOLUTION
) -> tuple[onnx.ModelProto, TruncationResult]:
    """Replace 3x3 conv weights (c_in > 1) by Tucker-2 and the largest Gemm weight by SVD, in place.

    Conv MACs of the factorized form are counted as the 1x1 -> 3x3 -> 1x1 chain would run them.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    spatial = size
    conv_macs = conv_macs_orig = 0
    ranks: list[tuple[str, int, int]] = []
    gemm_weights = []
    for node in m.graph.node:
        if node.op_type == "MaxPool":
            spatial //= 2
        elif node.op_type == "Conv":
            t = inits[node.input[1]]
            w = onnx.numpy_helper.to_array(t)
            c_out, c_in, kh, kw = w.shape
            full = spatial * spatial * c_out * c_in * kh * kw
            conv_macs_orig += full
            if c_in == 1:
                conv_macs += full
                continue
            r_out = min(c_out, round_up(conv_fraction * c_out))
            r_in = min(c_in, round_up(conv_fraction * c_in))
            t.CopyFrom(onnx.numpy_helper.from_array(tucker2_reconstruct(w, r_out, r_in), t.name))
            conv_macs += spatial * spatial * (c_in * r_in + r_in * r_out * kh * kw + r_out * c_out)
            ranks.append((node.name, r_out, r_in))
        elif node.op_type == "Gemm":
            gemm_weights.append(inits[node.input[1]])
    big = max(gemm_weights, key=lambda t: int(np.prod(t.dims)))
    w = onnx.numpy_helper.to_array(big)
    rank = round_up(fc_fraction * min(w.shape))
    big.CopyFrom(onnx.numpy_helper.from_array(svd_reconstruct(w, rank), big.name))
    ranks.append((big.name, rank, rank))
    return m, TruncationResult(conv_fraction, fc_fraction, conv_macs, conv_macs_orig, 0.0, ranks)


def truncation_check(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    conv_fractions=(0.5, 0.375, 0.25),
    fc_fraction=0.25,
    size: int = RESOLUTION,
) -> list[TruncationResult]:
    model = onnx.load(str(path))
    results = []
    for frac in conv_fractions:
        m, r = truncate_model(model, frac, fc_fraction, size)
        acc = ort_accuracy(m, x, y)
        results.append(dataclasses.replace(r, accuracy=acc))
        log.info(
            "truncation conv %.3f fc %.2f: conv MACs %.1fM -> %.1fM (%.2fx), acc %.4f",
            frac,
            fc_fraction,
            r.conv_macs_original / 1e6,
            r.conv_macs / 1e6,
            r.conv_macs_original / r.conv_macs,
            acc,
        )
    return results


# ----------------------------------------------------------------------------- model card


def fc_name(model: nn.Sequential) -> str:
    fc = next(m for m in model if isinstance(m, nn.Linear))
    return f"{fc.in_features}->{fc.out_features}"


def layer_table(model: nn.Sequential, size: int) -> str:
    macs = count_macs(model, size)
    rows = ["| # | layer | params | MACs |", "|---|---|---:|---:|"]
    for name, m in model.named_children():
        if isinstance(m, nn.Conv2d):
            desc = f"Conv {m.in_channels}->{m.out_channels}, 3x3, pad 1, + ReLU"
        elif isinstance(m, nn.Linear):
            desc = f"Gemm {m.in_features}->{m.out_features}"
        elif isinstance(m, nn.MaxPool2d):
            rows.append(f"| {name} | MaxPool 2x2 | 0 | - |")
            continue
        else:
            continue
        rows.append(f"| {name} | {desc} | {count_params(m):,} | {macs[name] / 1e6:.2f}M |")
    return "\n".join(rows)


def write_card(
    path: Path,
    model: nn.Sequential,
    splits: Splits,
    args: argparse.Namespace,
    stats: dict,
    truncation: list[TruncationResult],
) -> None:
    size = args.resolution
    macs = count_macs(model, size)
    conv_macs = sum(v for k, v in macs.items() if isinstance(model[int(k)], nn.Conv2d))
    trunc_rows = "\n".join(
        f"| {r.conv_fraction:.3f} | {r.fc_fraction:.2f} | "
        f"{', '.join(f'{a}/{b}' for _, a, b in r.ranks[:-1])} | {r.ranks[-1][1]} | "
        f"{r.conv_macs / 1e6:.1f}M ({r.conv_macs_original / r.conv_macs:.2f}x fewer) | "
        f"{r.accuracy * 100:.2f}% ({(r.accuracy - stats['ort_acc']) * 100:+.2f}) |"
        for r in truncation
    )
    bn_note = (
        "BatchNorm was used in training and folded into the conv weights and biases before\n"
        "export, so the graph is Conv / Relu / MaxPool / Flatten / Gemm only."
        if args.batchnorm
        else "No BatchNorm: plain convs with bias, so weight decay shapes the exported weights\n"
        "directly. The graph is Conv / Relu / MaxPool / Flatten / Gemm only."
    )
    nuclear_note = (
        f"""
Low-rank training penalty (`--nuclear-weight {args.nuclear_weight}`): the loss adds
lambda * sum over layers of ||W_(0)||_* / ||W||_F + ||W_(1)||_* / ||W||_F for every 3x3 conv with
more than one input channel (W = the conv weight with its BatchNorm scale folded in, as exported;
W_(0) the out x (in*3*3) and W_(1) the in x (out*3*3) unfoldings, the two channel modes Tucker-2
truncates) plus ||W||_* / ||W||_F for the {fc_name(model)} FC weight. Dividing by the Frobenius norm makes
it scale-free (weight decay or BatchNorm cannot satisfy it by shrinking weights). This is the
nuclear-norm / "singular value sparsification" way of training compressible networks (e.g.
Alvarez & Salzmann, "Compression-aware training of deep networks", NeurIPS 2017; Yang et al.,
"Learning low-rank deep neural networks via singular vector orthogonality regularization and
singular value sparsification", CVPR-W 2020): it concentrates the energy of each channel mode in
few singular values, so data-free truncation loses little.
"""
        if args.nuclear_weight > 0
        else ""
    )
    repro_note = (
        " GPU\ntraining is not bit-reproducible even on one machine. `--device cuda` needs a CUDA build"
        " of\ntorch; without a GPU leave it out: the same recipe runs on the CPU (one epoch took 73 s on\nthe 2-core development machine, about 18 min for 15 epochs)."
        if "--device cuda" in stats["command"]
        else ""
    )
    text = f"""# digits_vgg: bundled demo model

A VGG-style CNN trained on scikit-learn's 8x8 digits, upsampled to {size}x{size}. It is
deliberately over-parameterized, the regime where low-rank factorization pays off, and it is the
default demo model for onnxlr. Produced by `tools/train_digits_vgg.py`.

## Files

| file | contents |
|---|---|
| `digits_vgg.onnx` | opset 17; input `input` float32 [batch,1,{size},{size}], output `logits` float32 [batch,10] |
| `digits_vgg_test.npz` | held-out test split: `input` float32 [{len(splits.y_test)},1,{size},{size}], `labels` int64 [{len(splits.y_test)}] |
| `digits_vgg_calib.npz` | disjoint calibration split, same form, {len(splits.y_calib)} samples |

The npz `input` arrays are exactly what the model consumes: no further preprocessing.

## Architecture

{bn_note}

{layer_table(model, size)}

The last stage's {size // 8}x{size // 8} map goes through one more 2x2 max-pool (floor) before the
flatten, which keeps the first FC, and the file, small; nearly all the work is in the convolutions.

Total: **{count_params(model):,} parameters** ({count_params(model) * 4 / 2**20:.1f} MiB fp32),
**{sum(macs.values()) / 1e6:.1f}M MACs** per image, of which {conv_macs / 1e6:.1f}M
({conv_macs / sum(macs.values()) * 100:.1f}%) are in convolutions.

## Data

scikit-learn `load_digits()` (1797 images, 8x8, values 0-16; shipped with scikit-learn, no
download). Preprocessing: divide by 16, bilinear resize to {size}x{size}
(`align_corners=False`), clamp to [0,1], normalize with the train-split statistics
`(x - {splits.mean:.6f}) / {splits.std:.6f}`.

Splits are stratified by label with `sklearn.model_selection.train_test_split(random_state=seed)`
and disjoint: train {len(splits.y_train)}, calibration {len(splits.y_calib)},
test {len(splits.y_test)}. Training augmentation: random integer shifts of up to
{MAX_SHIFT_PX} px per axis.

## Training

SGD, Nesterov momentum 0.9, one-cycle LR (peak {args.lr}), weight decay {args.weight_decay}
(to make the weight spectra decay), batch 64, label smoothing 0.1, dropout 0.3 before the last
FC, {args.epochs} epochs, seed {args.seed}. Training took {stats["train_s"]:.0f} s on
{stats["train_device"]}, torch {stats["train_torch"]}.
{nuclear_note}
    {stats["command"]}

## Results

| metric | value |
|---|---|
| test accuracy, onnxruntime ({len(splits.y_test)} images) | **{stats["ort_acc"] * 100:.2f}%** |
| test accuracy, PyTorch | {stats["torch_acc"] * 100:.2f}% |
| calibration accuracy, onnxruntime | {stats["calib_acc"] * 100:.2f}% |
| ORT CPU batch-1 latency, median of {stats["runs"]} runs | **{stats["latency_ms"]:.2f} ms** (p10 {stats["latency_p10_ms"]:.2f} ms) |

Latency: onnxruntime {ort.__version__}, CPUExecutionProvider, default graph optimization,
`intra_op_num_threads=2`, on the machine that wrote this card ({os.cpu_count()} CPU cores, 1-minute
load average {stats["load"]:.2f} when the timing ended); it will differ elsewhere.{stats["eval_note"]}

## Compressibility check

Each 3x3 conv with more than one input channel has its weight replaced in place by its Tucker-2
(HOSVD on the two channel modes) reconstruction, ranks = ceil to a multiple of 8 of the fraction
times the channels; the {fc_name(model)} Gemm weight by its truncated SVD. "conv MACs" counts the
1x1 -> 3x3 -> 1x1 chain a Tucker-2 replacement would run (original conv MACs
{truncation[0].conv_macs_original / 1e6:.1f}M). Accuracy by onnxruntime on the test split.

| conv fraction | fc fraction | conv ranks (out/in) | fc rank | conv MACs | test accuracy |
|---|---|---|---|---|---|
{trunc_rows}

This is truncation only, without fine-tuning or data-aware rank selection.

## Reproduce

    python3 -m venv .venv-tools
    .venv-tools/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime numpy
    .venv-tools/bin/{stats["command"]}

Seeds are fixed, but bit-exact weights across machines or torch builds are not guaranteed.{repro_note}
"""
    path.write_text(text)


# ----------------------------------------------------------------------------- main


def save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    np.savez_compressed(path, input=x.astype(np.float32), labels=y.astype(np.int64))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("models"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument(
        "--no-batchnorm",
        dest="batchnorm",
        action="store_false",
        help="plain convs with bias and Kaiming init instead of BatchNorm (folded before export)",
    )
    p.add_argument(
        "--nuclear-weight",
        type=float,
        default=0.0,
        help="lambda of the scale-free nuclear-norm penalty on the channel-mode unfoldings of each "
        "conv (c_in > 1) and on the first FC weight; 0 disables it",
    )
    p.add_argument(
        "--init-onnx",
        type=Path,
        default=None,
        help="start from the weights of an exported digits_vgg.onnx (requires --no-batchnorm, "
        "since BatchNorm is folded in the export): penalized fine-tuning",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=RESOLUTION,
        help="input side the 8x8 digits are resized to",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device to train on (cpu, cuda); export, accuracy and latency run on the CPU",
    )
    p.add_argument(
        "--no-card", action="store_true", help="skip the truncation check and model card"
    )
    p.add_argument(
        "--evaluate-onnx",
        type=Path,
        default=None,
        help="do not train: take a model this script exported (its training arguments are in its "
        "metadata), write it and the splits to --out-dir, and measure accuracy, latency and "
        "compressibility on this machine for the card",
    )
    p.add_argument("--latency-runs", type=int, default=100)
    return p.parse_args(argv)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"one {torch.cuda.get_device_name(device)} GPU"
    return f"{torch.get_num_threads()} CPU threads"


def train_model(args: argparse.Namespace, splits: Splits) -> tuple[nn.Sequential, dict]:
    """Train as the arguments say; the BatchNorm-folded eval model and its training record."""
    model = build_model(args.batchnorm, args.resolution)
    if args.init_onnx is not None:
        if args.batchnorm:
            raise SystemExit(
                "--init-onnx needs --no-batchnorm (the export has BatchNorm folded in)"
            )
        load_onnx_weights(model, args.init_onnx)
        log.info(
            "initialized from %s: test acc %.4f",
            args.init_onnx,
            torch_accuracy(model, splits.x_test, splits.y_test),
        )
    log.info(
        "params %d, MACs %.1fM",
        count_params(model),
        sum(count_macs(model, args.resolution).values()) / 1e6,
    )
    model.to(args.device)
    train_s = train(
        model,
        splits,
        args.epochs,
        args.seed,
        args.lr,
        args.weight_decay,
        nuclear_weight=args.nuclear_weight,
        device=args.device,
    )
    command = (
        (
            f"python tools/train_digits_vgg.py --out-dir {args.out_dir} --epochs {args.epochs} "
            f"--seed {args.seed} --lr {args.lr} --weight-decay {args.weight_decay}"
            f" --resolution {args.resolution}"
        )
        + ("" if args.batchnorm else " --no-batchnorm")
        + (f" --nuclear-weight {args.nuclear_weight}" if args.nuclear_weight > 0 else "")
        + (f" --init-onnx {args.init_onnx}" if args.init_onnx is not None else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
    )
    training = {
        "command": command,
        "args": {k: getattr(args, k) for k in TRAINING_ARGS},
        "train_s": round(train_s, 1),
        "device": device_name(args.device),
        "torch": torch.__version__,
    }
    return fold_batchnorm(model.cpu()), training


TRAINING_ARGS = (
    "epochs",
    "seed",
    "lr",
    "weight_decay",
    "batchnorm",
    "nuclear_weight",
    "resolution",
)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "digits_vgg.onnx"

    if args.evaluate_onnx is not None:
        training = read_training(args.evaluate_onnx)
        for k, v in training["args"].items():
            setattr(args, k, v)
        args.init_onnx = None
    splits = load_splits(args.seed, args.resolution)
    log.info(
        "splits: train %d, calib %d, test %d",
        len(splits.y_train),
        len(splits.y_calib),
        len(splits.y_test),
    )
    if args.evaluate_onnx is None:
        folded, training = train_model(args, splits)
        export_onnx(folded, onnx_path, args.resolution, training)
        eval_note = ""
    else:
        # The export is BatchNorm-folded: a --no-batchnorm model has the folded one's layout.
        model = build_model(False, args.resolution)
        load_onnx_weights(model, args.evaluate_onnx)
        folded = fold_batchnorm(model)
        if args.evaluate_onnx.resolve() != onnx_path.resolve():
            onnx_path.write_bytes(args.evaluate_onnx.read_bytes())
        eval_note = (
            "\nThe model was trained with the command above and evaluated here (accuracy, latency,"
            "\ncompressibility, splits written) with\n`python tools/train_digits_vgg.py "
            f"--out-dir {args.out_dir} --evaluate-onnx PATH --latency-runs {args.latency_runs}`."
        )
    torch_acc = torch_accuracy(folded, splits.x_test, splits.y_test)
    ort_acc = ort_accuracy(onnx_path, splits.x_test, splits.y_test)
    calib_acc = ort_accuracy(onnx_path, splits.x_calib, splits.y_calib)
    log.info("test accuracy: torch %.4f, onnxruntime %.4f", torch_acc, ort_acc)
    if abs(torch_acc - ort_acc) > 1.0 / len(splits.y_test):
        raise RuntimeError(f"ORT accuracy {ort_acc} disagrees with torch {torch_acc}")

    save_npz(args.out_dir / "digits_vgg_test.npz", splits.x_test, splits.y_test)
    save_npz(args.out_dir / "digits_vgg_calib.npz", splits.x_calib, splits.y_calib)
    latency, p10, load = ort_latency_ms(onnx_path, args.resolution, runs=args.latency_runs)
    log.info("ORT batch-1 latency: median %.2f ms (p10 %.2f ms), load %.2f", latency, p10, load)
    if args.no_card:
        return
    truncation = truncation_check(onnx_path, splits.x_test, splits.y_test, size=args.resolution)
    stats = {
        "train_s": training["train_s"],
        "train_device": training["device"],
        "train_torch": training["torch"],
        "torch_acc": torch_acc,
        "ort_acc": ort_acc,
        "calib_acc": calib_acc,
        "latency_ms": latency,
        "latency_p10_ms": p10,
        "runs": args.latency_runs,
        "load": load,
        "command": training["command"],
        "eval_note": eval_note,
    }
    write_card(args.out_dir / "digits_vgg.md", folded, splits, args, stats, truncation)
    log.info("wrote %s", args.out_dir)


if __name__ == "__main__":
    main()
