"""Interruptions leave either no output or a complete one, and SIGTERM leaves no temp files.

The interrupted runs are forked from this (already imported) test process and call the real CLI
entry point, so a kill can land anywhere: loading, factorizing, writing the data file, fsync,
renames. The model carries a 8 MB constant next to its small MatMuls so that writing takes a
good share of each run. After every kill the output is either absent or byte-identical to the
output of an uninterrupted run (which loads and passes the checker).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr.cli import main
from onnxlr.errors import OnnxlrError
from onnxlr.model import io as g
from onnxlr.model.opset import runtime_max_opset

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

SEED = 1234
#: Kills land at random moments: each test makes its trials, then more (up to this many) until
#: the outcome it asserts on (a kill while writing, an interrupted run) has happened at least once,
#: so a busy machine that finishes a run before the kill lands does not fail the test.
MAX_TRIALS = 24


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"W{i}") for i in range(3)]
    inits.append(numpy_helper.from_array(rng.standard_normal((32, 1024, 64)).astype(np.float32), "big"))
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"W{i}"], [f"h{i}"], name=f"mm{i}")
             for i in range(3)]
    nodes.append(helper.make_node("Add", ["h2", "big"], ["y"], name="add"))
    graph = helper.make_graph(
        nodes, "faults",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 1024, 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _child(argv: list[str], stderr_path: Path) -> int:
    pid = os.fork()
    if pid == 0:  # the child: run the CLI, never return into pytest
        code = 1
        try:
            fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 -- lives until os._exit
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            code = main(argv)
        except BaseException:  # noqa: BLE001 -- a traceback here fails the test via stderr
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the compress child hung")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    src = d / "model.onnx"
    onnx.save(_model(), src)
    runtime_max_opset()  # probe onnxruntime once, before forking
    results = {}
    for mode, flags in (("inline", []), ("external", ["--external-data"])):
        ref = d / f"ref_{mode}.onnx"
        argv = ["compress", str(src), "-o", str(ref), "--rank", "1.0", "--force", "--round-to", "1", *flags]
        start = time.monotonic()
        assert _wait(_child(argv, d / "ref.err")) == 0, (d / "ref.err").read_text()
        elapsed = time.monotonic() - start
        onnx.checker.check_model(str(ref), full_check=True)
        results[mode] = (flags, elapsed, _content(ref))
    return d, src, _sha(src), results


def _content(path: Path) -> bytes:
    """The model with its external data read in: equal for equal models whatever the file names."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _outcome(d: Path, out: Path, reference: bytes) -> str:
    """'absent' or 'complete'; anything else fails."""
    data = out.with_name(out.name + ".data")
    if not out.exists():
        assert not data.exists(), "an orphan data file was left without its model"
        return "absent"
    assert _content(out) == reference, "the output exists but differs from a complete run"
    return "complete"


def _temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def _writing(d: Path, out: Path) -> bool:
    """Whether the child is writing: one of its temp files has bytes in it."""
    for p in d.iterdir():
        if p.name.startswith(f".{out.name}") and p.name.endswith(".tmp"):
            try:
                if p.stat().st_size > 0:
                    return True
            except FileNotFoundError:
                pass
    return False


def _kill_during_write(pid: int, d: Path, out: Path, delay: float, timeout: float,
                       sig: int = signal.SIGKILL) -> bool:
    """Wait until the child writes, then send ``sig`` ``delay`` s later; False if it never wrote."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _writing(d, out):
            time.sleep(delay)
            os.kill(pid, sig)
            return True
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return False  # it finished (left unreaped for the caller)
        time.sleep(0.0005)
    os.kill(pid, signal.SIGKILL)
    return False


@pytest.mark.parametrize("mode", ["inline", "external"])
def test_sigkill_at_random_moments(setup, mode):
    """Half the kills land anywhere in the run, half while the output is being written."""
    d, src, src_sha, results = setup
    flags, elapsed, reference = results[mode]
    rng = np.random.default_rng(SEED)
    outcomes, mid_write = [], 0
    for trial in range(MAX_TRIALS):
        if trial >= 8 and mid_write and "absent" in outcomes:
            break
        out = d / f"kill_{mode}.onnx"
        argv = ["compress", str(src), "-o", str(out), "--rank", "1.0", "--force", "--round-to", "1", *flags]
        pid = _child(argv, d / "kill.err")
        if trial % 2:
            hit = _kill_during_write(pid, d, out, rng.uniform(0.0, 0.03), timeout=10 * elapsed + 5)
            mid_write += hit
        else:
            time.sleep(rng.uniform(0.1, 1.1) * elapsed)
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcomes.append(_outcome(d, out, reference))
        # SIGKILL cannot clean up: only our hidden temp files may remain, never a partial output.
        for name in _temps(d):
            assert name.startswith(f".{out.name}"), name
            (d / name).unlink()
        for p in (out, out.with_name(out.name + ".data")):
            if p.exists():
                p.unlink()
    assert _sha(src) == src_sha
    assert mid_write >= 1, "no kill landed while the output was being written"
    assert "absent" in outcomes


@pytest.mark.parametrize("mode", ["inline", "external"])
def test_sigterm_is_clean(setup, mode):
    d, src, src_sha, results = setup
    flags, elapsed, reference = results[mode]
    rng = np.random.default_rng(SEED + 1)
    codes, mid_write = [], 0
    for trial in range(MAX_TRIALS):
        if trial >= 6 and mid_write and 128 + signal.SIGTERM in codes:
            break
        out = d / f"term_{mode}.onnx"
        err = d / "term.err"
        argv = ["compress", str(src), "-o", str(out), "--rank", "1.0", "--force", "--round-to", "1", *flags]
        pid = _child(argv, err)
        if trial % 2:
            mid_write += _kill_during_write(pid, d, out, rng.uniform(0.0, 0.02), 10 * elapsed + 5, signal.SIGTERM)
        else:
            time.sleep(rng.uniform(0.0, 1.1) * elapsed)
            os.kill(pid, signal.SIGTERM)
        code = _wait(pid)
        codes.append(code)
        text = err.read_text()
        assert "Traceback" not in text, text
        assert code in (0, 128 + signal.SIGTERM), (code, text)
        if code != 0:
            assert text.strip() == "onnxlr: terminated (SIGTERM); no partial output is left behind"
        outcome = _outcome(d, out, reference)
        assert outcome == "complete" or code != 0
        assert _temps(d) == []  # SIGTERM removes every temp file
        for p in (out, out.with_name(out.name + ".data")):
            if p.exists():
                p.unlink()
    assert _sha(src) == src_sha
    assert mid_write >= 1, "no SIGTERM landed while the output was being written"
    assert 128 + signal.SIGTERM in codes


# --- the atomic writer, fault by fault (in-process) -------------------------------------------


def _small() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "s",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace_data", "replace_model"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_failure_inside_save_leaves_nothing(tmp_path, monkeypatch, external, fail_at, error):
    out = tmp_path / "m.onnx"
    calls = {"replace": 0}
    real_replace, real_fsync = os.replace, os.fsync

    def boom():
        raise error(28, "No space left on device") if error is OSError else error()

    def replace(a, b):
        calls["replace"] += 1
        is_data = str(b).endswith(".data")
        if (fail_at == "replace_data" and is_data) or (fail_at == "replace_model" and not is_data):
            boom()
        return real_replace(a, b)

    def fsync(fd):
        if fail_at == "fsync":
            boom()
        return real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    if fail_at == "write":
        if not external:
            pytest.skip("the inline write is covered by fsync")
        real_write = g._write_external_data

        def write(model, path, location):
            real_write(model, path, location)
            boom()

        monkeypatch.setattr(g, "_write_external_data", write)
    if fail_at == "replace_data" and not external:
        pytest.skip("no data file without external data")
    expected = OnnxlrError if error is OSError else KeyboardInterrupt
    with pytest.raises(expected) as info:
        g.save_model_atomic(_small(), out, external_data=external)
    if expected is OnnxlrError:
        assert "cannot write" in str(info.value) and "No space left" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no output, no data file, no temp file


def test_existing_output_is_replaced_atomically(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    g.save_model_atomic(_small(), out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    model = onnx.load(str(out))
    assert numpy_helper.to_array(model.graph.initializer[0])[1, 2] == 66
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_interrupt_waits_for_the_critical_section_and_temp_files_are_tracked(tmp_path):
    reached = False
    with pytest.raises(KeyboardInterrupt), g.signals_deferred():
        g.interrupt(KeyboardInterrupt())
        reached = True  # the interrupt is held until the section ends
    assert reached
    with pytest.raises(KeyboardInterrupt):
        g.interrupt(KeyboardInterrupt())  # outside a section: at once
    tmp = g.temp_path(tmp_path, "m.onnx")
    assert tmp.exists() and tmp.name.startswith(".m.onnx.") and tmp.name.endswith(".tmp")
    g.remove_temp_files()  # what the CLI does on SIGTERM / Ctrl-C
    assert list(tmp_path.iterdir()) == []
