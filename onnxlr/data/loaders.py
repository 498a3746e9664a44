"""Python data loaders: ``--calib-loader file.py[:function]`` and ``--inputs-loader``.

Polygraphy's convention: a Python file defines a function (``load_data`` unless named after the
colon) that takes no arguments and returns an iterable of feed dicts, input name -> array at the
model's shapes (any batch size; each feed is split into samples along its batch axes, see
:mod:`.feeds`)::

    # data.py                               onnxlr compress model.onnx -o small.onnx \\
    def load_data():                            --calib-loader data.py:load_data
        for path in sorted(glob("*.wav")):
            yield {"x": features(path)}

The file is imported once; the function is called again for every pass over the data
(calibration makes several), so a generator keeps memory independent of the number of samples.

Every mistake in a loader is one ``OnnxlrError`` line naming the loader: the file is missing or
does not import (the exception's type and message), the function is missing or not callable, it
raises (on the call or while iterating: the exception's type and message), returns something not
iterable, yields something not a dict, names inputs the model does not have or leaves some out,
gives an input the wrong dtype or shape (input and both shapes), or yields nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onnxlr.data import feeds
from onnxlr.data.feeds import Source, split_samples
from onnxlr.errors import OnnxlrError
from onnxlr.runtime import InputSpec

DEFAULT_FUNCTION = "load_data"


@dataclass(frozen=True)
class DataLoader:
    """A user's data-loading function: ``path`` (a .py file) and the ``function`` it defines."""

    path: str
    function: str = DEFAULT_FUNCTION
    _module: dict = field(default_factory=dict, compare=False, repr=False)  # imported once

    @property
    def label(self) -> str:
        return f"{self.path}:{self.function}"

    def load(self) -> Callable[[], object]:
        """The function (importing the file the first time); OnnxlrError when it cannot be had."""
        if "module" not in self._module:
            self._module["module"] = _import_file(Path(self.path), self.label)
        module = self._module["module"]
        fn = getattr(module, self.function, None)
        if fn is None:
            defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                             and getattr(v, "__module__", None) == module.__name__)
            raise OnnxlrError(f"data loader {self.path} defines no function {self.function!r} (it defines: "
                              f"{', '.join(defined) or 'none'}); name it after a colon, e.g. {self.path}:my_loader")
        if not callable(fn):
            raise OnnxlrError(f"data loader {self.label} is a {type(fn).__name__}, not a function")
        return fn

    def to_source(self, specs: Sequence[InputSpec], what: str = "--calib") -> Source:
        """The samples of every feed the function returns, checked against ``specs``; the
        function is called again on every pass."""
        fn = self.load()  # import errors now, before any work
        label = f"{what} loader {self.label}"
        return Source(self.label, lambda: _samples(fn, specs, label))


def parse_loader(text: str) -> DataLoader:
    """``"file.py"`` or ``"file.py:function"`` -> DataLoader (the path may contain ':' itself, as
    in ``C:\\data\\load.py``: only a suffix after ``.py:`` names the function)."""
    text = str(text)
    path, sep, function = text.rpartition(":")
    if not sep or not path.endswith(".py") or not function.isidentifier():
        path, function = text, DEFAULT_FUNCTION
    if not path.endswith(".py"):
        raise OnnxlrError(f"data loader {text!r}: give a Python file, FILE.py or FILE.py:FUNCTION "
                          f"(default function: {DEFAULT_FUNCTION})")
    return DataLoader(path, function)


def is_loader_spec(text: object) -> bool:
    """Whether a data argument names a Python loader (``*.py`` or ``*.py:function``)."""
    if not isinstance(text, (str, os.PathLike)):
        return False
    text = os.fspath(text)
    return text.endswith(".py") or (".py:" in text and text.rpartition(":")[2].isidentifier())


def select_data(flag: str, data=None, *, loader: str | None = None, images=None):
    """What one of ``--calib`` / ``--inputs`` and its alternatives (``--calib-loader``,
    ``--calib-images``) name: at most one of them, as something :func:`open_source` takes
    (None: random inputs)."""
    given = [(name, value) for name, value in ((flag, data), (f"{flag}-loader", loader),
                                                 (f"{flag}-images", images)) if value is not None]
    if len(given) > 1:
        raise OnnxlrError(f"give one of {', '.join(name for name, _ in given)}, not several")
    if loader is not None:
        return parse_loader(loader)
    if images is not None:
        return images
    if data is not None and is_loader_spec(data):
        return parse_loader(data)
    return data


def open_source(data, specs: Sequence[InputSpec], *, what: str = "--inputs", **options) -> Source:
    """:func:`.feeds.open_source`, and ``"file.py"`` / ``"file.py:function"`` names a loader (the
    form ``--inputs`` and ``--calib`` take); this is ``onnxlr.data.open_source``."""
    if is_loader_spec(data):
        if options.get("shapes"):
            raise OnnxlrError("--shape applies to random inputs only; with data the data's shapes are used, so drop --shape")
        return parse_loader(os.fspath(data)).to_source(specs, what)
    return feeds.open_source(data, specs, what=what, **options)


def _import_file(path: Path, label: str):
    if not path.is_file():
        raise OnnxlrError(f"data loader {path}: no such file")
    name = f"onnxlr_loader_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise OnnxlrError(f"data loader {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # the loader may import its neighbours
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 -- the user's code
        raise OnnxlrError(f"data loader {path} does not import: {_describe(exc)}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def _samples(fn: Callable[[], object], specs: Sequence[InputSpec], label: str) -> Iterator[dict]:
    try:
        feeds = fn()
    except Exception as exc:  # noqa: BLE001 -- the user's code: any failure is one line
        raise OnnxlrError(f"{label} raised {_describe(exc)}") from None
    if isinstance(feeds, (Mapping, str, bytes)):
        raise OnnxlrError(f"{label} returned a {type(feeds).__name__}; return an iterable of feed dicts "
                          "(a list, or yield them one by one)")
    try:
        iterator = iter(feeds)
    except TypeError:
        raise OnnxlrError(f"{label} returned a {type(feeds).__name__}, not an iterable of feed dicts") from None
    names = [s.name for s in specs]
    count = 0
    while True:
        try:
            feed = next(iterator)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 -- the user's code
            raise OnnxlrError(f"{label} raised {_describe(exc)} while yielding item {count}") from None
        where = f"{label}, item {count}"
        if not isinstance(feed, Mapping):
            raise OnnxlrError(f"{where} is a {type(feed).__name__}, not a dict of input name -> array")
        unknown = sorted(str(k) for k in feed if k not in names)
        missing = [n for n in names if n not in feed]
        if unknown or missing:
            raise OnnxlrError(f"{where} has input names {sorted(map(str, feed))} but the model's inputs are "
                              f"{names}" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                              + (f" (missing: {', '.join(missing)})" if missing else ""))
        count += 1
        yield from split_samples(feed, specs, where)
    if count == 0:
        raise OnnxlrError(f"{label} yielded nothing; it must return feed dicts, input name -> array")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

