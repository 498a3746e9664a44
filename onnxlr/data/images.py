"""A folder of images as samples: ``--calib-images DIR`` with a stated preprocessing.

Every image file in the folder and its subfolders (.png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff,
.webp, .ppm, .pgm; sorted by path) becomes one sample of the model's one image input, a float
tensor [N, C, H, W] (NCHW) or [N, H, W, C] (NHWC) with C = 3 (RGB/BGR) or 1 (grayscale)::

    decode (Pillow; EXIF orientation applied) -> RGB, or L when C = 1
    resize, aspect kept, bilinear: the shorter side to ``resize`` (default: the smallest scale
        that covers H x W, so nothing is stretched) -> center crop H x W
    x = (pixel / scale - mean[c]) / std[c]      channels in ``channel_order``; mean and std per
                                                channel in that order (one value: every channel)
    lay out as NCHW or NHWC, batch axis 1, the input's float dtype

torchvision's ImageNet evaluation (Resize(256), CenterCrop(224), ToTensor, Normalize) is
``size=(224, 224), resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)``; Caffe-style
BGR models take ``channel_order="BGR", scale=1`` and a mean in pixel units.

The model must have no input besides the image (others: use a Python loader, :mod:`.loaders`).
Pillow is optional (``pip install onnxlr[images]``) and imported only here, only when used.
Images are decoded one at a time, so memory does not grow with their number.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxlr.data.feeds import Source, format_dims
from onnxlr.errors import OnnxlrError
from onnxlr.runtime import InputSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LAYOUTS = ("auto", "NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class ImageFolder:
    """A folder of image files and how to turn each into the model's image input (module doc)."""

    folder: str
    size: tuple[int, int] | None = None  # (H, W); None: the model's fixed H and W
    resize: int | None = None  # shorter side before the center crop; None: just cover H x W
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "auto"  # NCHW, NHWC, or auto: from where the model's input has 1 or 3 channels
    channel_order: str = "RGB"
    scale: float = 255.0
    input: str | None = None  # the image input; None: the model's only input

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise OnnxlrError(f"unknown --layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise OnnxlrError(f"unknown --channel-order {self.channel_order!r}: choose one of {', '.join(CHANNEL_ORDERS)}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise OnnxlrError(f"bad --size {self.size}; write S or H,W with positive integers, e.g. 224 or 224,320")
        if self.resize is not None and self.size is not None and self.resize < min(self.size):
            raise OnnxlrError(f"--resize {self.resize} is smaller than --size {self.size[0]},{self.size[1]}: "
                              "the center crop would not fit")
        if self.resize is not None and self.resize < 1:
            raise OnnxlrError(f"--resize must be a positive integer, got {self.resize}")
        if not self.std or any(s == 0 for s in self.std):
            raise OnnxlrError(f"--std {','.join(map(str, self.std))}: every value must be non-zero")
        if not self.scale > 0:
            raise OnnxlrError(f"--scale must be positive, got {self.scale}")

    @property
    def label(self) -> str:
        return f"images in {self.folder}"

    def files(self) -> list[Path]:
        folder = Path(self.folder)
        if not folder.is_dir():
            raise OnnxlrError(f"--calib-images {folder}: no such folder")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise OnnxlrError(f"--calib-images {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files

    def layout_for(self, specs: Sequence[InputSpec], what: str = "--calib-images") -> tuple[InputSpec, str, int, tuple[int, int]]:
        """The image input, its layout, channel count and (H, W); OnnxlrError when the model
        cannot take these images."""
        spec = _image_input(specs, self.input, what)
        if spec.dtype.kind != "f" or len(spec.dims) != 4:
            raise OnnxlrError(f"{what}: input {spec.name!r} is {spec.type} {format_dims(spec.dims)}; images "
                              "feed a float input of rank 4 (NCHW or NHWC)")
        layout = self.layout if self.layout != "auto" else _guess_layout(spec, what)
        c_axis, hw_axes = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
        channels = spec.dims[c_axis] or 3
        if channels not in (1, 3):
            raise OnnxlrError(f"{what}: input {spec.name!r} {format_dims(spec.dims)} has {channels} channels in "
                              f"{layout} layout; images give 1 (grayscale) or 3 (RGB); check --layout")
        declared = tuple(spec.dims[a] for a in hw_axes)
        size = self.size
        if size is None:
            if None in declared:
                raise OnnxlrError(f"{what}: input {spec.name!r} {format_dims(spec.dims)} leaves height or width "
                                  "dynamic; give --size H,W")
            size = declared
        for got, want in zip(size, declared):
            if want is not None and got != want:
                raise OnnxlrError(f"{what}: --size {size[0]},{size[1]} but input {spec.name!r} is "
                                  f"{format_dims(spec.dims)} ({layout})")
        for name, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) not in (1, channels):
                raise OnnxlrError(f"{name} has {len(values)} values; give 1 or {channels} (one per channel)")
        return spec, layout, channels, (int(size[0]), int(size[1]))

    def to_source(self, specs: Sequence[InputSpec], what: str = "--calib") -> Source:
        what = f"{what}-images" if what in ("--calib", "--inputs") else what
        spec, layout, channels, size = self.layout_for(specs, what)
        files = self.files()
        pillow()

        def samples() -> Iterator[dict]:
            for path in files:
                yield {spec.name: self.load(path, layout, channels, size, spec.dtype)}

        return Source(self.label, samples, len(files))

    def load(self, path: str | os.PathLike, layout: str = "NCHW", channels: int = 3,
             size: tuple[int, int] | None = None, dtype=np.float32) -> np.ndarray:
        """One image file as a sample [1, C, H, W] (NCHW) or [1, H, W, C] (NHWC)."""
        image_module, ops = pillow()
        size = size or self.size
        if size is None:
            raise OnnxlrError("give the image size (--size H,W)")
        try:
            with image_module.open(path) as img:
                img = ops.exif_transpose(img).convert("L" if channels == 1 else "RGB")
        except (OSError, ValueError, image_module.DecompressionBombError) as exc:
            raise OnnxlrError(f"--calib-images: cannot decode {path}: {exc}") from None
        img = cover_and_crop(img, size, self.resize)
        pixels = np.asarray(img, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.channel_order == "BGR":
            pixels = pixels[:, :, ::-1]
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        x = (pixels / np.float32(self.scale) - mean) / std
        if layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None], dtype=dtype)


def cover_and_crop(img, size: tuple[int, int], resize: int | None = None):
    """Resize (bilinear, aspect kept) so the shorter side is ``resize`` (None: the smallest scale
    covering ``size`` = (H, W)), then crop the center H x W."""
    image_module, _ = pillow()
    height, width = size
    w, h = img.size
    scale = resize / min(w, h) if resize is not None else max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), image_module.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def pillow():
    """Pillow's Image and ImageOps modules; one clear line when it is not installed."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise OnnxlrError("reading image files needs Pillow: pip install onnxlr[images]") from None
    return Image, ImageOps


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"224"`` -> (224, 224); ``"224,320"`` -> (224, 320) (height, width)."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise OnnxlrError(f"bad --size {text!r}; write S or H,W, e.g. 224 or 224,320")
    return values


def parse_floats(text: str | None, flag: str, default: tuple[float, ...]) -> tuple[float, ...]:
    if text is None:
        return default
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise OnnxlrError(f"bad {flag} {text!r}; write comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def image_folder(folder: str | None, *, size: str | None = None, resize: int | None = None,
                 mean: str | None = None, std: str | None = None, layout: str | None = None,
                 channel_order: str | None = None, scale: float | None = None,
                 input: str | None = None) -> ImageFolder | None:
    """An ImageFolder from the CLI's strings; None when no folder is given (then giving any of
    the image options is an OnnxlrError: they would be ignored)."""
    options = {"--size": size, "--resize": resize, "--mean": mean, "--std": std, "--layout": layout,
               "--channel-order": channel_order, "--scale": scale, "--input": input}
    if folder is None:
        given = [flag for flag, value in options.items() if value is not None]
        if given:
            raise OnnxlrError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --calib-images "
                              "only; give the image folder, or drop them")
        return None
    layout = "auto" if layout is None or layout.lower() == "auto" else layout.upper()
    return ImageFolder(folder, size=parse_size(size), resize=resize, mean=parse_floats(mean, "--mean", (0.0,)),
                       std=parse_floats(std, "--std", (1.0,)), layout=layout,
                       channel_order=(channel_order or "RGB").upper(), scale=255.0 if scale is None else float(scale),
                       input=input)


def _image_input(specs: Sequence[InputSpec], name: str | None, what: str) -> InputSpec:
    names = [s.name for s in specs]
    if name is not None and name not in names:
        raise OnnxlrError(f"{what}: --input {name!r} is not an input of the model (its inputs: {', '.join(names)})")
    if len(specs) != 1:
        others = [n for n in names if n != name] if name is not None else names
        raise OnnxlrError(f"{what} feeds one image input, but the model has input(s) {', '.join(others)} "
                          f"{'besides it' if name is not None else ''}".rstrip()
                          + "; feed models with several inputs with a Python loader (--calib-loader)")
    return specs[0]


def _guess_layout(spec: InputSpec, what: str) -> str:
    nchw, nhwc = spec.dims[1] in (1, 3), spec.dims[3] in (1, 3)
    if nchw != nhwc:
        return "NCHW" if nchw else "NHWC"
    raise OnnxlrError(f"{what}: cannot tell the layout of input {spec.name!r} {format_dims(spec.dims)}; "
                      "give --layout NCHW or NHWC")
