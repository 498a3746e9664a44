"""PP-OCRv6 small text recognizer (rapidocr==3.10.0) with rendered text lines.

Model: ``rapidocr/models/PP-OCRv6_rec_small.onnx`` copied unchanged out of the rapidocr wheel
(opset 11). Input ``x`` [batch, 3, 48, width] float32, output ``fetch_name_0``
[batch, width / 8, 18710] per-timestep class probabilities. Its character set is the model's
``character`` metadata entry (18708 lines); rapidocr decodes with
``["blank"] + character + [" "]``: index 0 is the CTC blank, the last index is a space.

Preprocessing as rapidocr's ``TextRecognizer.resize_norm_img`` (images are BGR, as cv2 loads
them): resize to height 48 keeping the aspect ratio (width ceil(48 * w / h), at most 320),
scale (x / 255 - 0.5) / 0.5, zero-pad on the right to width 320. All lines are padded to 320, so
the sets batch. Pillow's bilinear resize stands in for cv2.resize (no opencv here); the lines
are mostly upscaled, where the two agree closely.

Data: text lines (words from scikit-learn's dataset descriptions, numbers, dates, amounts)
rendered with Pillow in DejaVu and STIX fonts from matplotlib's wheel, dark on light, mildly
blurred and noised; fixed seed. 300 evaluation lines and 200 disjoint calibration lines.
Ground truth for ``eval``: ``texts`` [300] str. Metric: character accuracy 1 - CER (total edit
distance over total reference characters) after CTC greedy decoding, and exact line accuracy.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np

from . import common

NAME = "ppocr-v6-rec"
INPUT = "x"
WHEEL = "rapidocr==3.10.0"
MODEL_IN_WHEEL = "rapidocr/models/PP-OCRv6_rec_small.onnx"
FONT_WHEEL = "matplotlib==3.11.2"
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "STIXGeneral.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBol.ttf",
)
HEIGHT, WIDTH = 48, 320
MAX_SQUEEZE = 1.3  # lines up to 30% wider than 320 at height 48 are squeezed, as rapidocr does
N_CALIB, N_EVAL = 200, 300
SEED = 20240502
EVAL_SETS = ("eval",)
FRESH = "fresh"  # lines rendered on demand (:func:`fresh`), scored as ``eval``


# ----------------------------------------------------------------------------- text
def vocabulary() -> list[str]:
    """Distinct words (2-12 letters) from scikit-learn's bundled dataset descriptions."""
    import sklearn.datasets

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    words = set()
    for f in sorted(descr.glob("*.rst")):
        words.update(re.findall(r"\b[A-Za-z][a-z]{1,11}\b", f.read_text(encoding="utf-8")))
    return sorted(words)


def random_token(rng: np.random.Generator, words: list[str]) -> str:
    kind = rng.random()
    if kind < 0.70:
        w = words[rng.integers(len(words))]
        r = rng.random()
        return w.upper() if r < 0.1 else w.capitalize() if r < 0.3 else w
    if kind < 0.80:
        return str(int(rng.integers(0, 100000)))
    if kind < 0.87:
        return f"{rng.uniform(0, 1000):.{int(rng.integers(1, 3))}f}"
    if kind < 0.93:
        return f"{rng.integers(1990, 2030)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    return f"${rng.integers(1, 999)}.{rng.integers(0, 100):02d}"


def random_line(rng: np.random.Generator, words: list[str]) -> str:
    return " ".join(random_token(rng, words) for _ in range(int(rng.integers(1, 7))))


# ----------------------------------------------------------------------------- rendering
def render(text: str, font_path: Path, rng: np.random.Generator):
    """Render ``text`` dark-on-light as an RGB PIL image with a small margin, tilted by up to 2
    degrees, blurred and noised; None if the line is more than MAX_SQUEEZE times too wide."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(str(font_path), int(rng.integers(13, 28)))
    x0, y0, x1, y1 = font.getbbox(text)
    mx, my = int(rng.integers(2, 10)), int(rng.integers(2, 8))
    w, h = x1 - x0 + 2 * mx, y1 - y0 + 2 * my
    if math.ceil(HEIGHT * w / h) > WIDTH * MAX_SQUEEZE:
        return None
    bg = tuple(int(v) for v in rng.integers(150, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 100, 3))
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((mx - x0, my - y0), text, font=font, fill=fg)
    img = img.rotate(float(rng.uniform(-2, 2)), resample=Image.BILINEAR, fillcolor=bg)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.3))))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(3, 12), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def preprocess(img_rgb) -> np.ndarray:
    """rapidocr ``resize_norm_img`` with max_wh_ratio 320/48: [3, 48, 320] float32 (BGR order)."""
    from PIL import Image

    w, h = img_rgb.size
    resized_w = min(WIDTH, math.ceil(HEIGHT * w / h))
    img = img_rgb.resize((resized_w, HEIGHT), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32)[:, :, ::-1].transpose(2, 0, 1) / 255.0
    out = np.zeros((3, HEIGHT, WIDTH), np.float32)
    out[:, :, :resized_w] = (x - 0.5) / 0.5
    return out


def make_lines(fonts: list[Path], n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` distinct rendered lines: inputs [n, 3, 48, 320] and their texts."""
    rng = np.random.default_rng(seed)
    words = vocabulary()
    images, texts, seen = [], [], set()
    while len(texts) < n:
        text = random_line(rng, words)
        if text in seen:
            continue
        img = render(text, fonts[len(texts) % len(fonts)], rng)
        if img is None:
            continue
        seen.add(text)
        texts.append(text)
        images.append(preprocess(img))
    return np.stack(images), texts


# ----------------------------------------------------------------------------- decoding, metric
def charset_from_meta(meta: dict[str, str]) -> list[str]:
    """rapidocr's index -> character table: blank, the model's characters, then a space."""
    return ["blank"] + meta["character"].splitlines() + [" "]


def ctc_greedy(indices: np.ndarray, charset: list[str], blank: int = 0) -> list[str]:
    """Greedy CTC decoding of argmax ``indices`` [b, T]: collapse repeats, drop blanks."""
    texts = []
    for row in indices:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != blank
        texts.append("".join(charset[i] for i in row[keep]))
    return texts


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(predicted: list[str], texts: list[str] | np.ndarray) -> dict:
    """Character accuracy 1 - CER (sum of edit distances / sum of reference lengths), clipped
    at 0, and the fraction of lines read exactly."""
    dist = sum(edit_distance(p, str(t)) for p, t in zip(predicted, texts))
    chars = sum(len(str(t)) for t in texts)
    exact = sum(p == str(t) for p, t in zip(predicted, texts))
    return {"char_accuracy": max(0.0, 1.0 - dist / chars), "line_accuracy": exact / len(texts),
            "edit_distance": int(dist), "chars": int(chars), "n": len(texts)}


def compact(outputs: list[np.ndarray]) -> list[np.ndarray]:
    """Keep only the per-timestep argmax of the [b, T, 18710] probabilities."""
    return [outputs[0].argmax(axis=-1).astype(np.int32)]


def score(eval_set: str, outputs: list[np.ndarray], gt: dict[str, np.ndarray],
          meta: dict[str, str] | None = None) -> dict:
    """Character accuracy of the model's outputs (probabilities [b, T, C] or their argmax
    [b, T]). The character set comes from the model's metadata; if the model lost it, from the
    copy saved with the ground truth, and ``charset_from_model`` says so."""
    predicted, from_model = _read(eval_set, outputs, gt, meta)
    result = char_accuracy(predicted, gt["texts"])
    result["charset_from_model"] = from_model
    return result


def parts(eval_set: str, outputs: list[np.ndarray], gt: dict[str, np.ndarray],
          meta: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Per line: characters read right (length less edit distance, of the length; the sums'
    ratio is char_accuracy before its clip at 0) and whether the line was read exactly."""
    predicted, _ = _read(eval_set, outputs, gt, meta)
    texts = [str(t) for t in gt["texts"]]
    length = np.array([len(t) for t in texts], dtype=np.float64)
    dist = np.array([edit_distance(p, t) for p, t in zip(predicted, texts)], dtype=np.float64)
    exact = np.array([p == t for p, t in zip(predicted, texts)], dtype=np.float64)
    return {"char_accuracy": np.stack([length - dist, length]),
            "line_accuracy": np.stack([exact, np.ones_like(exact)])}


def _read(eval_set: str, outputs: list[np.ndarray], gt: dict[str, np.ndarray],
          meta: dict[str, str] | None) -> tuple[list[str], bool]:
    """(the lines the model read, whether its character set came from the model's metadata)."""
    if eval_set not in (*EVAL_SETS, FRESH):
        raise ValueError(f"unknown eval set {eval_set!r}; valid: {', '.join((*EVAL_SETS, FRESH))}")
    meta = meta or {}
    from_model = "character" in meta
    charset = charset_from_meta(meta if from_model else {"character": str(gt["character"])})
    out = outputs[0]
    return ctc_greedy(out.argmax(axis=-1) if out.ndim == 3 else out, charset), from_model


# ----------------------------------------------------------------------------- build
def fresh(root: Path, n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``n`` more lines rendered as the sets were, with another ``seed``, none of whose texts is in
    the calibration or evaluation set: (inputs, ground truth) for a larger held-out comparison."""
    folder = root / NAME
    gt = common.load_npz(folder / "eval_gt.npz")
    used = {str(t) for t in gt["texts"]} | {str(t) for t in common.load_npz(folder / "calib_texts.npz")["texts"]}
    font_dir = common.wheel_dir(root, FONT_WHEEL) / "matplotlib" / "mpl-data" / "fonts" / "ttf"
    images, texts = make_lines([font_dir / f for f in FONTS], n + len(used), seed)
    keep = [i for i, t in enumerate(texts) if t not in used][:n]
    return {INPUT: images[keep]}, {"texts": np.asarray([texts[i] for i in keep]), "character": gt["character"]}


def build(root: Path) -> Path:
    import onnx

    out = root / NAME
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    shutil.copyfile(common.wheel_dir(root, WHEEL) / MODEL_IN_WHEEL, onnx_path)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}

    font_dir = common.wheel_dir(root, FONT_WHEEL) / "matplotlib" / "mpl-data" / "fonts" / "ttf"
    fonts = [font_dir / f for f in FONTS]
    images, texts = make_lines(fonts, N_CALIB + N_EVAL, SEED)
    calib_idx, eval_idx = common.split_indices(len(texts), N_CALIB, SEED)
    texts_arr = np.asarray(texts)
    common.save_npz(out / "calib.npz", {INPUT: images[calib_idx]})
    common.save_npz(out / "eval.npz", {INPUT: images[eval_idx]})
    common.save_npz(out / "eval_gt.npz", {"texts": texts_arr[eval_idx],
                                          "character": np.asarray(meta["character"])})
    common.save_npz(out / "calib_texts.npz", {"texts": texts_arr[calib_idx]})
    return out
