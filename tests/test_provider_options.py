"""--provider-option KEY=VALUE (e.g. use_tf32=0 on CUDA): checked, handed to the session in
onnxruntime's own (provider, options) form, refused for the CPU provider. CUDA is simulated: a
session that records what it was given and runs on the CPU provider underneath."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from test_verify import cnn, no_traceback, perturbed_w2, save

from onnxlr import runtime
from onnxlr.cli import main
from onnxlr.errors import OnnxlrError
from onnxlr.proof.bench import bench
from onnxlr.proof.verify import verify

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def ref(tmp_path):
    return save(cnn(), tmp_path / "ref.onnx")


@pytest.fixture
def cand(tmp_path):
    return save(cnn(w2=perturbed_w2(0.01)), tmp_path / "cand.onnx")


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'available'; sessions record their providers argument and run on the CPU."""
    given: list = []
    real = ort.InferenceSession

    class Session:
        def __init__(self, source, sess_options=None, providers=None):
            given.append(providers)
            self._real = real(source, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return list(CUDA)

        def __getattr__(self, name):
            return getattr(self._real, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(CUDA))
    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(runtime, "preload_gpu_libraries", lambda: None)
    monkeypatch.setattr(runtime, "session_device", lambda session: "cpu")  # no IOBinding on a CPU build
    return given


def test_options_are_parsed_and_checked():
    assert runtime.parse_provider_options(None) == {}
    assert runtime.parse_provider_options(["use_tf32=0", " cudnn_conv_algo_search = DEFAULT "]) == {
        "use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}
    assert runtime.parse_provider_options({"use_tf32": False, "device_id": 0}) == {"use_tf32": "0", "device_id": "0"}
    for bad in ("use_tf32", "=0", "use_tf32="):
        with pytest.raises(OnnxlrError, match="expected KEY=VALUE"):
            runtime.parse_provider_options([bad])
    with pytest.raises(OnnxlrError, match="given twice"):
        runtime.parse_provider_options(["use_tf32=0", "use_tf32=1"])


def test_options_go_to_the_named_provider_in_onnxruntimes_form(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", *CUDA])
    assert runtime.resolve_provider("cuda", ["use_tf32=off"]) == [
        ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert runtime.resolve_provider("cuda", {"use_tf32": "ON"})[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    assert runtime.resolve_provider("tensorrt", ["trt_fp16_enable=true"])[0] == (
        "TensorrtExecutionProvider", {"trt_fp16_enable": "1"})
    assert runtime.resolve_provider("cuda", []) == CUDA  # no options: plain names, as before
    with pytest.raises(OnnxlrError, match="use_tf32='maybe'.*is a boolean: use 0 or 1"):
        runtime.resolve_provider("cuda", ["use_tf32=maybe"])
    names = runtime.provider_names(runtime.resolve_provider("cuda", ["use_tf32=0"]))
    assert names == CUDA


def test_cpu_provider_refuses_options(ref, capsys):
    with pytest.raises(OnnxlrError, match="the CPU provider takes none"):
        runtime.resolve_provider("cpu", ["use_tf32=0"])
    assert main(["verify", ref, ref, "--provider-option", "use_tf32=0"]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert "use_tf32=0" in err and "--provider cuda" in err
    assert main(["bench", ref, "--runs", "2", "--provider-option", "use_tf32=0"]) == 2
    no_traceback(capsys.readouterr().err)


def test_compress_checks_the_option_before_compressing(ref, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["compress", ref, "-o", str(out), "--rank", "0.5", "--provider-option", "use_tf32=0"]) == 2
    assert "applies to --verify" in capsys.readouterr().err
    assert main(["compress", ref, "-o", str(out), "--rank", "0.5", "--verify",
                 "--provider-option", "use_tf32=0"]) == 2
    assert "the CPU provider takes none" in capsys.readouterr().err
    assert not out.exists()


def test_option_reaches_every_session_on_cuda(ref, cand, fake_cuda, capsys):
    want = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    result = verify(ref, cand, provider="cuda", provider_options={"use_tf32": "0"}, max_rel_error=None,
                    per_layer=True)
    assert result.providers == CUDA
    assert len(fake_cuda) >= 4 and all(p == want for p in fake_cuda)  # both models, and per layer
    fake_cuda.clear()
    timing = bench([ref, cand], provider="cuda", provider_options=["use_tf32=0"], runs=2, warmup=0)
    assert timing.providers == CUDA and fake_cuda == [want, want]
    fake_cuda.clear()
    assert main(["verify", ref, cand, "--provider", "cuda", "--provider-option", "use_tf32=1",
                 "--max-rel-error", "none"]) == 0
    assert fake_cuda and all(p == [("CUDAExecutionProvider", {"use_tf32": "1"}), "CPUExecutionProvider"]
                             for p in fake_cuda)
    fake_cuda.clear()
    assert main(["bench", ref, "--provider", "cuda", "--runs", "2", "--warmup", "0",
                 "--provider-option", "use_tf32=0"]) == 0
    assert fake_cuda == [want]
    fake_cuda.clear()
    assert main(["verify", ref, cand, "--provider", "cuda"]) in (0, 1)  # without: names only
    assert fake_cuda and all(p == CUDA for p in fake_cuda)
    capsys.readouterr()
