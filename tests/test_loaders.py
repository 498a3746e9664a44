"""Python data loaders (--calib-loader, --inputs-loader, --inputs FILE.py:FN) and image folders
(--calib-images), through the CLI: a recurrent model whose state input has its batch axis second,
a small CNN fed PNG and JPEG files of different sizes, and every bad loader as one line, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlr import data
from onnxlr.cli import main
from onnxlr.errors import OnnxlrError
from onnxlr.proof.bench import bench
from onnxlr.runtime import InputSpec

PIL = pytest.importorskip("PIL.Image")

T, H = 16, 16  # features per step and hidden size of the recurrent model


def _recurrent_model() -> onnx.ModelProto:
    """x [batch, T] @ W + sum over the 2 directions of state [2, batch, H] -> y [batch, H]."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((T, 4)) @ rng.standard_normal((4, H)) + 0.01 * rng.standard_normal((T, H)))
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="proj"),
        helper.make_node("ReduceSum", ["state", "axes"], ["s"], name="sum_dirs", keepdims=0),
        helper.make_node("Add", ["xw", "s"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "recurrent",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", T]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", H])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W"),
                     numpy_helper.from_array(np.array([0], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _cnn_model() -> onnx.ModelProto:
    """x [N, 3, 8, 8] -> Conv 3x3 (16) -> Relu -> Conv 3x3 (16) -> y."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((16, 16, 3, 3)).astype(np.float32) / 12
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


LOADER = f"T, H = {T}, {H}\n" + """
import numpy as np
from pathlib import Path

def load_data():
    with open(Path(__file__).with_name("calls.txt"), "a") as f:
        f.write("call\\n")
    rng = np.random.default_rng(0)
    for _ in range(5):  # 5 feeds of 3 samples: 15 samples, the state's batch axis is its second
        yield {"x": rng.standard_normal((3, T)).astype(np.float32),
               "state": rng.standard_normal((2, 3, H)).astype(np.float32)}

def other():
    return [{"x": np.zeros((1, T), np.float32), "state": np.zeros((2, 1, H), np.float32)}]
"""


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def recurrent(tmp_path) -> tuple[Path, Path]:
    model = tmp_path / "rnn.onnx"
    onnx.save(_recurrent_model(), model)
    loader = tmp_path / "feeds.py"
    loader.write_text(LOADER)
    return model, loader


def test_loader_with_a_recurrent_state_calibrates_and_verifies(recurrent, tmp_path, capsys):
    model, loader = recurrent
    out_model = tmp_path / "small.onnx"
    code, out, err = _run(["compress", model, "-o", out_model, "--rank", "4", "--calib-loader", loader], capsys)
    assert code == 0, err
    assert f"{loader}:load_data" in out and "calibrated" in out
    calls = (tmp_path / "calls.txt").read_text().count("call")
    assert calls >= 2  # the function is called again for every pass, not held in memory
    compressed = onnx.load(out_model)
    assert [n.op_type for n in compressed.graph.node].count("MatMul") == 2

    for flags in (["--inputs", f"{loader}:load_data"], ["--inputs-loader", loader],
                  ["--inputs", f"{loader}:other"]):
        code, out, err = _run(["verify", model, out_model, "--max-rel-error", "0.05", *flags], capsys)
        assert code == 0, err
    # samples: 15 from load_data (split along x's axis 0 and state's axis 1)
    result = data.open_source(f"{loader}:load_data", data.model_input_specs(_recurrent_model()))
    samples = list(result)
    assert len(samples) == 15 and samples[0]["state"].shape == (2, 1, H) and samples[0]["x"].shape == (1, T)


def test_bench_times_the_first_feed_of_a_loader(recurrent):
    model, loader = recurrent
    result = bench([model], inputs=data.parse_loader(str(loader)), batch=3, runs=2, warmup=0)
    assert result.batch == 3
    with pytest.raises(OnnxlrError, match="--shape applies to random inputs only"):
        bench([model], inputs=str(loader), shapes={"x": (1, T)}, runs=1, warmup=0)


def test_bench_cli_takes_inputs_loader(recurrent, capsys):
    model, loader = recurrent
    code, out, err = _run(["bench", model, "--inputs-loader", loader, "--batch", "2", "--runs", "2",
                           "--warmup", "0"], capsys)
    assert code == 0, err
    assert "2 sample(s) per run" in out


BAD_LOADERS = {
    "missing function": ("def something_else():\n    return []\n", "defines no function 'load_data'"),
    "import error": ("import not_a_module_xyz\n", "does not import: ModuleNotFoundError: No module named"),
    "syntax error": ("def load_data(:\n", "does not import: SyntaxError"),
    "raises": ("def load_data():\n    raise ValueError('no data here')\n", "raised ValueError: no data here"),
    "raises while yielding": ("def load_data():\n    if False:\n        yield\n    raise RuntimeError('disk gone')\n",
                              "raised RuntimeError: disk gone while yielding item 0"),
    "not iterable": ("def load_data():\n    return 3\n", "returned a int, not an iterable of feed dicts"),
    "one dict": ("import numpy as np\ndef load_data():\n    return {'x': np.zeros((1, 16), np.float32)}\n",
                 "returned a dict; return an iterable of feed dicts"),
    "not a dict": ("import numpy as np\ndef load_data():\n    yield [np.zeros((1, 16), np.float32)]\n",
                   "item 0 is a list, not a dict"),
    "wrong names": (("import numpy as np\ndef load_data():\n    yield {'input': np.zeros((1, 16), np.float32), "
                      "'state': np.zeros((2, 1, 16), np.float32)}\n"),
                     "unknown: input) (missing: x)"),
    "wrong shape": (("import numpy as np\ndef load_data():\n    yield {'x': np.zeros((1, 5), np.float32), "
                      "'state': np.zeros((2, 1, 16), np.float32)}\n"),
                     "array 'x' has shape [1, 5] but the model's input is [?,16]"),
    "wrong rank": (("import numpy as np\ndef load_data():\n    yield {'x': np.zeros((1, 16), np.float32), "
                    "'state': np.zeros((1, 16), np.float32)}\n"),
                    "array 'state' has shape [1, 16] but the model's input is [2,?,16]"),
    "wrong dtype": (("import numpy as np\ndef load_data():\n    yield {'x': np.zeros((1, 16), np.int64), "
                      "'state': np.zeros((2, 1, 16), np.float32)}\n"),
                     "array 'x' has dtype int64 but the model wants float32"),
    "nothing": ("def load_data():\n    return []\n", "yielded nothing"),
}


@pytest.mark.parametrize("command", ["compress", "verify"])
@pytest.mark.parametrize("case", sorted(BAD_LOADERS))
def test_bad_loader_is_one_line_exit_2(case, command, recurrent, tmp_path, capsys):
    model, _ = recurrent
    source, fragment = BAD_LOADERS[case]
    loader = tmp_path / "bad.py"
    loader.write_text(source)
    out_model = tmp_path / "out.onnx"
    argv = (["compress", model, "-o", out_model, "--rank", "4", "--calib-loader", loader] if command == "compress"
            else ["verify", model, model, "--inputs-loader", loader])
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("onnxlr: error: ") and fragment in err, err
    assert not out_model.exists()


def test_missing_loader_file_and_several_sources(recurrent, tmp_path, capsys):
    model, loader = recurrent
    code, _, err = _run(["verify", model, model, "--inputs", tmp_path / "nope.py:make"], capsys)
    assert code == 2 and "no such file" in err and err.count("\n") == 1
    code, _, err = _run(["compress", model, "-o", tmp_path / "o.onnx", "--calib", tmp_path / "a.npz",
                         "--calib-loader", loader], capsys)
    assert code == 2 and "give one of --calib, --calib-loader, not several" in err


# --- images ---------------------------------------------------------------------------------


def _image(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    sizes = [(16, 8), (8, 8), (23, 31), (40, 12), (9, 9), (64, 48)]
    for i, (w, h) in enumerate(sizes):
        suffix = ".png" if i % 2 == 0 else ".jpg"
        target = folder / ("sub" if i == 5 else "") / f"img{i}{suffix}"
        PIL.fromarray(_image(w, h, i)).save(target)
    (folder / "notes.txt").write_text("not an image")
    return folder


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_image_preprocessing_numerically(image_folder, tmp_path):
    folder = data.ImageFolder(str(image_folder), size=(8, 8), mean=MEAN, std=STD, layout="NCHW")
    assert len(folder.files()) == 6  # png and jpg, subfolders included, the .txt left out
    pixels = _image(16, 8, 0).astype(np.float32)  # img0.png, 16 wide x 8 high: no resize, crop cols 4..11
    want = ((pixels[:, 4:12] / 255 - np.float32(MEAN)) / np.float32(STD)).transpose(2, 0, 1)[None]
    got = folder.load(image_folder / "img0.png", "NCHW", 3, (8, 8))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    bgr = data.ImageFolder(str(image_folder), size=(8, 8), mean=(100.0,), std=(2.0,), scale=1,
                           channel_order="BGR", layout="NHWC")
    got = bgr.load(image_folder / "img0.png", "NHWC", 3, (8, 8))
    np.testing.assert_allclose(got, ((pixels[:, 4:12, ::-1] - 100) / 2)[None], rtol=1e-6)

    flat = tmp_path / "flat.png"  # a constant image stays constant through the bilinear resize
    PIL.fromarray(np.full((30, 50, 3), (10, 200, 90), np.uint8)).save(flat)
    got = folder.load(flat, "NCHW", 3, (8, 8))
    want = (np.float32([10, 200, 90]) / 255 - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_allclose(got[0, :, 3, 3], want, rtol=1e-5)
    assert got.shape == (1, 3, 8, 8) and np.ptp(got[0], axis=(1, 2)).max() < 1e-5

    specs = data.model_input_specs(_cnn_model())  # through the data layer, first sample = first file
    first = next(iter(data.open_source(folder, specs)))
    np.testing.assert_allclose(first["x"], folder.load(image_folder / "img0.png", "NCHW", 3, (8, 8)))


def test_cover_and_crop_rule():
    from onnxlr.data.images import cover_and_crop

    img = PIL.fromarray(_image(40, 12, 3))
    assert cover_and_crop(img, (8, 8)).size == (8, 8)
    assert cover_and_crop(img, (24, 24)).size == (24, 24)  # upscaled to cover
    assert cover_and_crop(PIL.fromarray(_image(300, 200, 3)), (224, 224), resize=256).size == (224, 224)


def test_compress_calib_images(image_folder, tmp_path, capsys):
    model = tmp_path / "cnn.onnx"
    onnx.save(_cnn_model(), model)
    out_model = tmp_path / "small.onnx"
    code, out, err = _run(["compress", model, "-o", out_model, "--rank", "0.5", "--include", "conv2",
                           "--calib-images", image_folder, "--size", "8", "--mean", ",".join(map(str, MEAN)),
                           "--std", ",".join(map(str, STD)), "--layout", "NCHW", "--channel-order", "RGB"], capsys)
    assert code == 0, err
    assert f"images in {image_folder}" in out and "calibrated" in out
    assert out_model.exists()


def test_calibration_does_not_decode_an_image_folder_to_count_it(image_folder, tmp_path, capsys, monkeypatch):
    """The folder knows how many images it has: calibration reads each image once per pass, and
    once more only where a source cannot say its length."""
    from onnxlr.data import images

    model = tmp_path / "cnn.onnx"
    onnx.save(_cnn_model(), model)
    decoded = []
    real_load = images.ImageFolder.load
    monkeypatch.setattr(images.ImageFolder, "load", lambda self, *a, **k: decoded.append(1) or real_load(self, *a, **k))
    argv = ["compress", model, "-o", tmp_path / "o.onnx", "--rank", "0.5", "--include", "conv2",
            "--calib-images", image_folder, "--size", "8", "--overwrite"]
    assert _run(argv, capsys)[0] == 0
    known = len(decoded)
    decoded.clear()
    real_to_source = images.ImageFolder.to_source

    def without_count(self, *a, **k):
        source = real_to_source(self, *a, **k)
        source.count = None
        return source

    monkeypatch.setattr(images.ImageFolder, "to_source", without_count)
    assert _run(argv, capsys)[0] == 0
    assert len(decoded) - known == 6  # the one reading that counted the 6 images


@pytest.mark.parametrize("flags, fragment", [
    (["--size", "16"], "--size 16,16 but input 'x' is [?,3,8,8]"),
    (["--layout", "NHWC"], "has 8 channels in NHWC layout"),
    (["--mean", "0.1,0.2"], "--mean has 2 values; give 1 or 3"),
    (["--std", "0"], "every value must be non-zero"),
    (["--input", "y"], "--input 'y' is not an input of the model"),
])
def test_bad_image_options(flags, fragment, image_folder, tmp_path, capsys):
    model = tmp_path / "cnn.onnx"
    onnx.save(_cnn_model(), model)
    code, _, err = _run(["compress", model, "-o", tmp_path / "o.onnx", "--calib-images", image_folder, *flags], capsys)
    assert code == 2 and fragment in err and err.count("\n") == 1, err


def test_image_options_need_a_folder_and_one_input(recurrent, image_folder, tmp_path, capsys):
    model, _ = recurrent
    code, _, err = _run(["compress", model, "-o", tmp_path / "o.onnx", "--mean", "0.5"], capsys)
    assert code == 2 and "--mean applies to --calib-images only" in err
    code, _, err = _run(["compress", model, "-o", tmp_path / "o.onnx", "--calib-images", image_folder], capsys)
    assert code == 2 and "the model has input(s) x, state" in err and "--calib-loader" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    specs = [InputSpec("x", "tensor(float)", (None, 3, 8, 8), ("N", None, None, None))]
    with pytest.raises(OnnxlrError, match="holds no image files"):
        data.open_source(data.ImageFolder(str(empty)), specs)


def test_without_pillow_one_line(image_folder, tmp_path, capsys, monkeypatch):
    model = tmp_path / "cnn.onnx"
    onnx.save(_cnn_model(), model)
    monkeypatch.setitem(sys.modules, "PIL", None)
    code, _, err = _run(["compress", model, "-o", tmp_path / "o.onnx", "--calib-images", image_folder], capsys)
    assert code == 2 and "pip install onnxlr[images]" in err and err.count("\n") == 1, err
