"""Each step's contribution: fp32 original -> factorized fp32 -> factorized int8, with the int8
original (what a user would otherwise ship) as a reference row.

    original.onnx ──factorize──> factorized fp32 ──quantize──> factorized int8 (the written file)
         └────────────────────────quantize (same config, same --calib)──> int8 original (reference)

Speed: one interleaved benchmark of all four models (:func:`onnxlr.proof.bench.bench`, order
original, factorized int8, factorized fp32, int8 original), speedups per round against the fp32
original. Error: each model against the fp32 original on the same verify inputs
(:func:`onnxlr.proof.verify.verify`), the worst output's relative L2 error and top-1 agreement.
The shipped model's verification carries the tolerances (it decides pass or fail); the others are
measured with the tolerances off.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onnxlr import model as graph
from onnxlr import runtime
from onnxlr.errors import OnnxlrError
from onnxlr.proof.bench import DEFAULT_RUNS, BenchResult, bench
from onnxlr.proof.verify import DEFAULT_MAX_REL_ERROR, DEFAULT_SAMPLES, VerifyResult, verify
from onnxlr.report.tables import format_rows

log = logging.getLogger("onnxlr")

ORIGINAL, FACTORIZED, SHIPPED, INT8_ORIGINAL = ("fp32 original", "factorized fp32", "factorized int8",
                                                "int8 original (reference)")


@dataclass
class StepRow:
    """One model of the comparison: speed against the fp32 original and output error against it."""

    step: str
    model: str
    median_ms: float
    speedup: float  # median over interleaved rounds of t_original / t_model (1.0 for the original)
    speedup_p10: float
    speedup_p90: float
    rel_error: float  # worst output's relative L2 error against the fp32 original (0 for itself)
    top1: float | None  # worst class-score output's top-1 agreement (None: no such output)


@dataclass
class StepsResult:
    """Truthy iff the shipped model's verification passed."""

    rows: list[StepRow]
    verification: VerifyResult  # the shipped model against the fp32 original, with tolerances
    timing: BenchResult  # original, shipped, factorized fp32[, int8 original]
    notes: list[str] = field(default_factory=list)
    int8_original: dict | None = None  # its QuantReport, when quantized here

    def __bool__(self) -> bool:
        return bool(self.verification)

    def row(self, step: str) -> StepRow | None:
        return next((r for r in self.rows if r.step == step), None)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "notes": self.notes, "int8_original": self.int8_original,
                "verification": self.verification.to_dict(), "timing": self.timing.to_dict()}

    def to_table(self) -> str:
        rows = []
        for r in self.rows:
            speed = "1.00x" if r.step == ORIGINAL else f"{r.speedup:.2f}x ({r.speedup_p10:.2f}-{r.speedup_p90:.2f})"
            rows.append([r.step, f"{r.median_ms:.3g}", speed, "0" if r.step == ORIGINAL else f"{r.rel_error:.3g}",
                         "-" if r.top1 is None else f"{100 * r.top1:.1f}%"])
        lines = [format_rows(["step", "median ms", "speedup vs fp32 (p10-p90)", "rel err vs fp32",
                              "top-1 agree"], rows)]
        t = self.timing
        lines.append(f"{t.providers[0]}, {t.threads} threads, {t.runs} interleaved rounds; errors on "
                     f"{self.verification.inputs.get('samples')} samples ({self.verification.inputs.get('source')})")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def compare_steps(
    original: runtime.ModelLike,
    factorized: runtime.ModelLike,
    quantized: runtime.ModelLike,
    *,
    int8_original: runtime.ModelLike | None = None,
    quantize=None,
    calib=None,
    calib_samples: int | None = None,
    inputs=None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    int_range: tuple[int, int] = (0, 100),
    provider: str = "cpu",
    provider_options: Mapping[str, str] | Sequence[str] | None = None,
    runs: int = DEFAULT_RUNS,
    threads: int | None = None,
    max_rel_error: float | None = DEFAULT_MAX_REL_ERROR,
    min_top1: float | None = None,
) -> StepsResult:
    """Compare the fp32 original, the factorized fp32 model and the factorized int8 model, and the
    int8 original: ``int8_original`` if given, else the original quantized here with ``quantize``
    (an ``onnxlr.quant.QuantizeConfig``) on ``calib`` as compress quantizes (the row is left out,
    with a note, when that fails or no ``quantize`` is given). Raises ``OnnxlrError`` on bad input.
    """
    check = {"inputs": inputs, "shapes": shapes if inputs is None else None, "samples": samples, "seed": seed,
             "int_range": int_range, "provider": provider, "provider_options": provider_options}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="onnxlr-steps-") as tmp:
        quant_report = None
        if int8_original is None and quantize is not None:
            int8_original, quant_report = _quantize_original(original, quantize, calib, calib_samples,
                                                             Path(tmp) / "original_int8.onnx", notes)
        elif int8_original is None:
            notes.append("no int8 original: no quantization config given")
        shipped = verify(original, quantized, max_rel_error=max_rel_error, min_top1=min_top1, **check)
        others = {FACTORIZED: verify(original, factorized, max_rel_error=None, **check)}
        models = [original, quantized, factorized]
        if int8_original is not None:
            others[INT8_ORIGINAL] = verify(original, int8_original, max_rel_error=None, **check)
            models.append(int8_original)
        timing = bench(models, provider=provider, provider_options=provider_options, runs=runs, threads=threads,
                       shapes=shapes or None, seed=seed, int_range=int_range)
    t = timing.models
    rows = [StepRow(ORIGINAL, t[0].model, t[0].median_ms, 1.0, 1.0, 1.0, 0.0, _worst_top1(shipped, same=True))]
    order = [(FACTORIZED, 2, others[FACTORIZED]), (SHIPPED, 1, shipped)]
    if INT8_ORIGINAL in others:
        order.append((INT8_ORIGINAL, 3, others[INT8_ORIGINAL]))
    for step, i, result in order:
        rows.append(StepRow(step, t[i].model, t[i].median_ms, t[i].speedup, t[i].speedup_p10, t[i].speedup_p90,
                            max((o.rel_error for o in result.outputs), default=0.0), _worst_top1(result)))
    return StepsResult(rows=rows, verification=shipped, timing=timing, notes=notes, int8_original=quant_report)


def _quantize_original(original, quantize, calib, calib_samples, path: Path, notes: list[str]):
    """(path of the int8 original or None, its QuantReport dict or None)."""
    from onnxlr.quant import quantize_on

    try:
        model = original if not isinstance(original, (str, Path)) else graph.load_model(original)
        quantized, report = quantize_on(model, quantize, calib, calib_samples)
    except OnnxlrError as exc:
        notes.append(f"no int8 original: quantizing the original failed: {exc}")
        log.warning("the int8 original row is left out: %s", exc)
        return None, None
    graph.save_model_atomic(quantized, path)
    return str(path), report.to_dict()


def _worst_top1(result: VerifyResult, same: bool = False) -> float | None:
    values = [o.top1 for o in result.outputs if o.top1 is not None]
    if not values:
        return None
    return 1.0 if same else min(values)
