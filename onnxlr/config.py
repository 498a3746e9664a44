"""What compress is asked to do: CompressConfig, per-layer rules, and which layers they select.

Rules and ``--include``/``--exclude`` patterns are regular expressions searched in a layer's label
(its node name; ``<op>_<position>`` for a node without a name), in its output tensor's name (unique
in a model, so it addresses one layer even where node names repeat), or matched in full against its
op type. Rules come from a --config file (JSON or YAML):

The file is an ordered list of entries (or a mapping with that list under ``rules``):

    - match: "^features\\.0"      # regex on the node name, or an op type (Conv, Gemm, MatMul)
      method: svd                 # optional: auto, svd, tucker, cp (default: --method)
      rank: 0.5                   # optional: any --rank form (default: --rank)
    - match: Gemm
      rank: evbmf

The first entry that matches a layer wins; layers no entry matches use --method and --rank.
Every error names the file and the entry.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from onnxlr.errors import OnnxlrError
from onnxlr.methods import CHOICES as METHODS
from onnxlr.model.targets import Target
from onnxlr.quant.config import QuantizeConfig
from onnxlr.ranks import RankSpec, parse_rank
from onnxlr.report.compress import CompressReport

log = logging.getLogger("onnxlr")


@dataclass(frozen=True)
class Rule:
    """One per-layer rule: layers whose name or op type matches ``match`` use this method/rank."""

    match: str
    method: str | None = None
    rank: RankSpec | None = None


@dataclass(frozen=True)
class CompressConfig:
    method: str = "auto"
    rank: RankSpec = field(default_factory=lambda: parse_rank("0.5"))
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    force: bool = False
    round_to: int = 8  # measured by tools/bench_round_to.py: ORT CPU's NCHWc convs
    target_opset: int | None = None
    # Data-aware refinement (onnxlr.calib): anything onnxlr.data.open_source takes (an .npz, a
    # folder of them, a dict of arrays, a Source, a callable returning feed dicts).
    calib: object = None
    calib_samples: int | None = None
    calib_mode: str = "asymmetric"
    # Input whose zeros mark padding tokens to leave out of the statistics: "auto" (attention_mask
    # when the model has it), "none", or an input name.
    calib_mask: str = "auto"
    # Bytes of calibration statistics held at once (None: half the memory available), and the
    # asymmetric passes at most (an int, "all" for one pass per layer, None: onnxlr.calib's default).
    calib_memory: int | None = None
    calib_stages: int | str | None = None
    # Budgeted allocation (onnxlr.budget): at most one goal; per-layer method/rank chosen to meet it.
    target_speedup: float | None = None
    target_macs: float | None = None
    max_error: float | None = None
    provider: str = "cpu"  # execution provider the budget's latencies are measured on
    cache_dir: str | os.PathLike | None = None  # latency cache (default ~/.cache/onnxlr)
    threads: int | None = None  # intra-op threads the budget times with (None: ONNXLR_BENCH_THREADS or all cores)
    damage: str = "auto"  # damage estimator with --calib: auto, full, sensitivity, shipped (onnxlr.budget.damage)
    plan_time: float | None = None  # seconds the damage phase may take (falls back to cheaper estimators)
    search_time: float | None = None  # seconds of in-context search per goal (None: the default, 0: none)
    # Input shapes (name -> dims) for sizing layers (MACs) where the model leaves dims dynamic and
    # no calibration data gives them.
    shapes: dict = field(default_factory=dict)
    # INT8 after factorizing (onnxlr.quant): chains are balanced before splicing, then the model is
    # quantized, calibrated on the --calib samples that refinement fits on and checked on the
    # held-out ones (every 5th). None: the written model stays float.
    quantize: QuantizeConfig | None = None

    @property
    def budgeted(self) -> bool:
        """Whether a budget goal chooses the per-layer methods and ranks."""
        return self.target_speedup is not None or self.target_macs is not None or self.max_error is not None

    def __post_init__(self):
        if self.method not in METHODS:
            raise OnnxlrError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        object.__setattr__(self, "rank", parse_rank(self.rank))
        if int(self.round_to) < 1:
            raise OnnxlrError(f"--round-to must be an integer >= 1, got {self.round_to}")
        for pattern in self.include + self.exclude:
            compile_pattern(pattern)
        for i, rule in enumerate(self.rules):
            if rule.method is not None and rule.method not in METHODS:
                raise OnnxlrError(f"rule {i + 1} ({rule.match!r}): unknown method {rule.method!r}; choose one of {', '.join(METHODS)}")
            compile_pattern(rule.match, f"rule {i + 1}")
        if self.target_opset is not None and self.target_opset < 1:
            raise OnnxlrError(f"--target-opset must be a positive opset number, got {self.target_opset}")
        if self.calib_mode not in ("asymmetric", "symmetric"):
            raise OnnxlrError(f"unknown --calib-mode {self.calib_mode!r}: choose one of asymmetric, symmetric")
        if self.calib_memory is not None:
            object.__setattr__(self, "calib_memory", parse_size(self.calib_memory, "--calib-memory"))
        if self.calib_stages is not None and self.calib_stages != "all":
            try:
                stages = int(self.calib_stages)
            except (TypeError, ValueError):
                stages = 0
            if stages < 1:
                raise OnnxlrError(f"--calib-stages must be an integer >= 1 or 'all', got {self.calib_stages!r}")
            object.__setattr__(self, "calib_stages", stages)
        if self.calib_samples is not None and int(self.calib_samples) < 1:
            raise OnnxlrError(f"--calib-samples must be an integer >= 1, got {self.calib_samples}")
        check_budget(self)
        check_quantize(self)


def check_quantize(config: CompressConfig) -> None:
    """Refuse, before any work, a quantization that cannot run without calibration data."""
    quant = config.quantize
    if quant is None:
        return
    if not isinstance(quant, QuantizeConfig):
        raise OnnxlrError(f"quantize must be an onnxlr.quant.QuantizeConfig or None, got {type(quant).__name__}")
    if config.calib is None and quant.mode == "static":
        raise OnnxlrError("static INT8 quantization needs calibration data to set activation ranges: "
                          "pass --calib DATA, or use --quant-mode dynamic")
    if config.calib is None and quant.max_error is not None:
        raise OnnxlrError("--quant-max-error measures output errors on held-out --calib samples: pass --calib DATA")


def check_budget(config: CompressConfig) -> None:
    goals = [n for n in ("target_speedup", "target_macs", "max_error") if getattr(config, n) is not None]
    if len(goals) > 1:
        raise OnnxlrError(f"give one budget goal, not {' and '.join('--' + n.replace('_', '-') for n in goals)}")
    if config.target_speedup is not None and not float(config.target_speedup) > 1:
        raise OnnxlrError(f"--target-speedup must be a number > 1, got {config.target_speedup}")
    if config.target_macs is not None and not 0 < float(config.target_macs) < 1:
        raise OnnxlrError(f"--target-macs must be a fraction in (0, 1), got {config.target_macs}")
    if config.max_error is not None and not float(config.max_error) > 0:
        raise OnnxlrError(f"--max-error must be a number > 0, got {config.max_error}")
    from onnxlr.budget.damage import ESTIMATORS

    if config.damage not in ESTIMATORS:
        raise OnnxlrError(f"unknown --damage {config.damage!r}: choose one of {', '.join(ESTIMATORS)}")
    if config.damage == "shipped" and config.quantize is None:
        raise OnnxlrError("--damage shipped measures each candidate on the int8 model compress writes: "
                          "it needs --quantize int8")
    if config.plan_time is not None and not float(config.plan_time) > 0:
        raise OnnxlrError(f"--plan-time must be a number of seconds > 0, got {config.plan_time}")
    if config.search_time is not None and not float(config.search_time) >= 0:
        raise OnnxlrError(f"--search-time must be a number of seconds >= 0, got {config.search_time}")
    if config.threads is not None and int(config.threads) < 1:
        raise OnnxlrError(f"--threads must be an integer >= 1, got {config.threads}")


def parse_size(value, what: str) -> int:
    """Bytes from an int or a string such as 512M, 4G, 1.5G, 800000000."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?\s*", str(value))
    if not match or float(match.group(1)) <= 0:
        raise OnnxlrError(f"{what}: give a size such as 512M or 4G, got {value!r}")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def compile_pattern(pattern: str, where: str = "pattern") -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise OnnxlrError(f"{where}: invalid regular expression {pattern!r}: {exc}") from None



KEYS = ("match", "method", "rank")


def load_rules(path: str | Path) -> tuple[Rule, ...]:
    path = Path(path)
    if not path.is_file():
        raise OnnxlrError(f"config file {path} does not exist; check the path")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxlrError(f"config file {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {first}") from None
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"]
    if not isinstance(data, list):
        raise OnnxlrError(f"config file {path}: expected a list of entries {{match, method, rank}}")
    return tuple(_rule(path, i + 1, entry) for i, entry in enumerate(data))


def _rule(path: Path, number: int, entry) -> Rule:
    where = f"config file {path}, entry {number}"
    if not isinstance(entry, dict):
        raise OnnxlrError(f"{where}: expected a mapping with keys {', '.join(KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise OnnxlrError(f"{where}: unknown key {unknown[0]!r}; valid keys are {', '.join(KEYS)}")
    if "match" not in entry or not isinstance(entry["match"], str) or not entry["match"]:
        raise OnnxlrError(f"{where}: 'match' (a regex on node names or an op type) is required")
    compile_pattern(entry["match"], where)
    method = entry.get("method")
    if method is not None and method not in METHODS:
        raise OnnxlrError(f"{where}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    rank = entry.get("rank")
    if rank is not None:
        try:
            rank = parse_rank(rank)
        except OnnxlrError as exc:
            raise OnnxlrError(f"{where}: {exc}") from None
    return Rule(match=entry["match"], method=method, rank=rank)


# --- selecting layers -----------------------------------------------------------------------


def apply_filters(targets: list[Target], config: CompressConfig, report: CompressReport) -> None:
    def matches(pattern: str, target: Target) -> bool:
        return selects(compile_pattern(pattern), target)

    for pattern in config.include:
        if not any(matches(pattern, t) for t in targets):
            report.warnings.append(f"--include {pattern!r} matches no layer")
    for pattern in config.exclude:
        if not any(matches(pattern, t) for t in targets):
            report.warnings.append(f"--exclude {pattern!r} matches no layer")
    for target in targets:
        if target.skip is not None:
            continue
        if config.include and not any(matches(p, target) for p in config.include):
            target.skip = "not selected by --include"
        excluded = [p for p in config.exclude if matches(p, target)]
        if excluded:
            target.skip = f"excluded by --exclude {excluded[0]!r}"
    for warning in report.warnings:
        log.warning(warning)


def rule_for(target: Target, config: CompressConfig) -> tuple[str, RankSpec]:
    for rule in config.rules:
        if selects(compile_pattern(rule.match), target):
            return rule.method or config.method, rule.rank or config.rank
    return config.method, config.rank


def selects(regex: re.Pattern, target: Target) -> bool:
    output = target.node.output[0] if target.node.output else ""
    return bool(regex.search(target.name) or (output and regex.search(output)) or regex.fullmatch(target.op_type))
