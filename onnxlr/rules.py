"""Per-layer rules from a --config file (JSON or YAML).

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
from pathlib import Path

from onnxlr.compress import METHODS, Rule, _compile
from onnxlr.errors import OnnxlrError
from onnxlr.ranks import parse_rank

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
    _compile(entry["match"], where)
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
