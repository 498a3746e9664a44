"""onnxlr: compress ONNX models by low-rank factorization, and prove the result.

    import onnxlr
    model, report = onnxlr.compress("model.onnx", method="auto", rank="evbmf")
    print(report.to_table())
"""

from onnxlr.config import CompressConfig, Rule
from onnxlr.errors import OnnxlrError
from onnxlr.pipeline import compress, compress_file
from onnxlr.ranks import RankSpec, parse_rank
from onnxlr.report.compress import CompressReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "CompressConfig",
    "CompressReport",
    "LayerReport",
    "OnnxlrError",
    "RankSpec",
    "Rule",
    "compress",
    "compress_file",
    "parse_rank",
]
