"""The one input layer: feeds for verify, bench, calibration and budgets (see :mod:`.feeds`;
Python loaders: :mod:`.loaders`; image folders: :mod:`.images`)."""

from onnxlr.data.feeds import (
    DEFAULT_CHUNK,
    HOLDOUT_EVERY,
    Source,
    batch_axes,
    batches,
    cast_inputs,
    fixed_batch,
    is_held_out,
    limited,
    model_input_specs,
    npz_files,
    parse_int_range,
    parse_shape,
    parse_shapes,
    random_source,
    resolve_shapes,
    row_mask_input,
    sample_rows,
    split_held_out,
)
from onnxlr.data.images import ImageFolder, image_folder
from onnxlr.data.loaders import DataLoader, open_source, parse_loader, select_data

__all__ = [
    "DEFAULT_CHUNK", "HOLDOUT_EVERY", "DataLoader", "ImageFolder", "Source", "batch_axes", "batches", "cast_inputs", "fixed_batch",
    "image_folder", "is_held_out", "limited", "model_input_specs", "npz_files", "open_source", "parse_int_range", "parse_loader", "parse_shape", "parse_shapes", "random_source",
    "resolve_shapes", "row_mask_input", "sample_rows", "select_data", "split_held_out",
]
