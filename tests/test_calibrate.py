"""Calibration end to end: patches, streaming data, and data-aware compression of tiny models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import cnn_model, conv_model, run_ort
from onnx import TensorProto, helper, numpy_helper

from onnxlr import data
from onnxlr.calib import collect as calibrate
from onnxlr.cli import _compress_config, build_parser
from onnxlr.errors import OnnxlrError
from onnxlr.layers import ConvLayer
from onnxlr.pipeline import compress


@pytest.mark.parametrize(
    "kernel,strides,dilations,pads,auto_pad,group",
    [
        ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "NOTSET", 1),
        ((3, 2), (2, 1), (1, 2), (0, 1, 2, 0), "NOTSET", 2),
        ((3, 3), (2, 2), (1, 1), (0, 0, 0, 0), "SAME_UPPER", 1),
        ((2, 2), (2, 2), (1, 1), (0, 0, 0, 0), "SAME_LOWER", 1),
        ((3,), (2,), (2,), (1, 2), "NOTSET", 1),
    ],
)
def test_patches_reproduce_the_conv_at_sampled_positions(kernel, strides, dilations, pads, auto_pad, group):
    rng = np.random.default_rng(0)
    s, t = 4, 6
    shape = (2, s) + (7,) * len(kernel)
    weight = rng.standard_normal((t, s // group, *kernel)).astype(np.float32)
    bias = rng.standard_normal(t).astype(np.float32)
    model = conv_model(shape, weight, bias=bias, group=group, strides=strides, dilations=dilations,
                       pads=None if auto_pad != "NOTSET" else pads, auto_pad=auto_pad)
    x = rng.standard_normal(shape).astype(np.float32)
    y = run_ort(model, {"x": x})[0]
    layer = ConvLayer(weight, None, group, strides, dilations, pads if auto_pad == "NOTSET" else (0,) * (2 * len(kernel)), auto_pad)
    assert calibrate.out_spatial(layer, x.shape[2:]) == y.shape[2:]
    sample_idx = np.repeat(np.arange(2), 10)
    positions = np.stack([rng.integers(0, o, 20) for o in y.shape[2:]], axis=1)
    patches = calibrate.sample_patches(layer, x, sample_idx, positions)
    t_g = t // group
    for gi, p in enumerate(patches):
        w_g = weight[gi * t_g : (gi + 1) * t_g].reshape(t_g, -1)
        got = p @ w_g.T + bias[gi * t_g : (gi + 1) * t_g]
        want = np.stack([y[(b, slice(gi * t_g, (gi + 1) * t_g), *pos)] for b, pos in zip(sample_idx, positions)])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_npz_is_streamed_in_chunks_up_to_the_limit(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((23, 3, 4)).astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, x=a)
    np.savez_compressed(tmp_path / "e.npz", x=a[:5])
    model = conv_model((None, 3, 4), rng.standard_normal((2, 3, 1)).astype(np.float32))
    from onnxlr.runtime import input_specs, make_session

    specs = input_specs(make_session(model))
    chunks = list(data.batches(data.open_source(path, specs), specs, 4))
    assert [c["x"].shape[0] for c in chunks] == [4, 4, 4, 4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([c["x"] for c in chunks]), a)
    folder = data.open_source(tmp_path, specs)
    assert sum(c["x"].shape[0] for c in data.batches(data.limited(folder, 25), specs, 4)) == 25
    assert sum(1 for _ in folder) == 28
    with pytest.raises(OnnxlrError, match="no array for input"):
        np.savez(tmp_path / "bad.npz", y=a)
        list(data.open_source(tmp_path / "bad.npz", specs))


def _anisotropic_images(n, rng, c=3, spatial=4):
    """Inputs with strongly correlated channels and a mean, so data-aware fitting matters (one
    fixed mixing for every call: calibration and held-out data share the distribution)."""
    mix = np.random.default_rng(99).standard_normal((c, c)) * np.array([3.0, 0.3, 0.03])[None, :]
    z = rng.standard_normal((n, c, spatial, spatial))
    return (np.einsum("ij,njhw->nihw", mix, z) + 0.5).astype(np.float32)


def _linear_model(rng, k=24, hidden=32, out=16, bias=False):
    """x [b, seq, k] -> MatMul -> Relu -> Gemm-free MatMul -> y (two 2-D weights); with ``bias``
    each MatMul is followed by an Add of a constant vector, as transformer exports have it."""
    w1 = rng.standard_normal((k, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, out)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    if bias:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
                 helper.make_node("Add", ["h0", "b1"], ["h"], name="add1"),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("MatMul", ["r", "w2"], ["y0"], name="mm2"),
                 helper.make_node("Add", ["b2", "y0"], ["y"], name="add2")]
        inits += [numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
                  numpy_helper.from_array(rng.standard_normal(out).astype(np.float32), "b2")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _token_rows(rng, width=24, seq=5, mean=0.0):
    """A sampler of [n, seq, width] inputs with one fixed anisotropic covariance (eigenvalues over
    four decades, in a random basis) and an optional mean: where data-aware fits matter."""
    basis, _ = np.linalg.qr(rng.standard_normal((width, width)))
    scales = np.logspace(0, -2, width)
    return lambda n: ((rng.standard_normal((n, seq, width)) * scales) @ basis.T + mean).astype(np.float32)


def _rel(model, ref, feeds_list):
    errs, refs = 0.0, 0.0
    for feeds in feeds_list:
        y, y0 = run_ort(model, feeds)[0], run_ort(ref, feeds)[0]
        errs += float(np.sum((y - y0) ** 2))
        refs += float(np.sum(y0**2))
    return np.sqrt(errs / refs)


# Measured end-to-end held-out error ratios (data-aware / data-free) at rank 0.5: svd 0.66,
# tucker 0.65, cp 0.86-0.88 (CP refits only its last factor).
@pytest.mark.parametrize("method,factor", [("svd", 0.75), ("tucker", 0.75), ("cp", 0.92)])
def test_data_aware_cnn_beats_data_free_on_held_out_data(tmp_path, method, factor):
    rng = np.random.default_rng(2)
    model = cnn_model(0, channels=(3, 16, 16), spatial=4)  # fixed batch 1: fed one sample at a time
    calib, held = _anisotropic_images(160, rng), _anisotropic_images(20, rng)
    np.savez(tmp_path / "calib.npz", x=calib)
    options = {"method": method, "rank": "0.5", "round_to": 1, "exclude": ("fc",)}
    free, free_report = compress(model, **options)
    errors = {"free": _rel(free, model, [{"x": h[None]} for h in held])}
    for mode in ("symmetric", "asymmetric"):
        aware, report = compress(model, calib=str(tmp_path / "calib.npz"), calib_mode=mode, **options)
        onnx.checker.check_model(aware, full_check=True)
        assert [layer.ranks for layer in report.layers] == [layer.ranks for layer in free_report.layers]
        assert any("calib:" in n for layer in report.layers for n in layer.notes or [])
        errors[mode] = _rel(aware, model, [{"x": h[None]} for h in held])
    assert errors["symmetric"] < factor * errors["free"], errors
    assert errors["asymmetric"] < factor * errors["free"], errors


def test_data_aware_matmul_with_dynamic_batch_and_sample_limit(tmp_path):
    rng = np.random.default_rng(3)
    model = _linear_model(rng)
    make = _token_rows(rng)
    np.savez(tmp_path / "calib.npz", x=make(300))
    held = make(40)
    free, _ = compress(model, rank="6", round_to=1)
    aware, report = compress(model, rank="6", round_to=1, calib=str(tmp_path / "calib.npz"), calib_samples=120)
    assert "on 120 samples" in " ".join(report.model_notes)
    assert _rel(aware, model, [{"x": held}]) < 0.5 * _rel(free, model, [{"x": held}])


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_matmul_followed_by_a_bias_add_gets_a_refitted_bias(tmp_path, mode):
    """MatMul + Add(constant) is how transformers export a linear layer: the Add's constant is the
    layer's bias, and calibration (which centers the inputs) rewrites it."""
    rng = np.random.default_rng(4)
    model = _linear_model(rng, bias=True)
    make = _token_rows(rng, mean=2.0)
    np.savez(tmp_path / "calib.npz", x=make(200))
    held = make(40)
    free, _ = compress(model, rank="6", round_to=1)
    aware, _report = compress(model, rank="6", round_to=1, calib=str(tmp_path / "calib.npz"), calib_mode=mode)
    onnx.checker.check_model(aware, full_check=True)
    adds = [n for n in aware.graph.node if n.op_type == "Add"]
    assert len(adds) == 2 and all(any("_lr_bias" in i for i in n.input) for n in adds), adds
    assert {"b1", "b2"}.isdisjoint(i.name for i in aware.graph.initializer)  # old biases dropped
    assert _rel(aware, model, [{"x": held}]) < 0.5 * _rel(free, model, [{"x": held}])


def test_calibrates_linear_layers_too_big_to_keep_a_reconstruction(tmp_path, monkeypatch):
    """Big FC layers keep no reconstruction (svd.MAX_RECONSTRUCTION_SIZE): calibration rebuilds it."""
    from onnxlr.methods import svd

    monkeypatch.setattr(svd, "MAX_RECONSTRUCTION_SIZE", 1)
    rng = np.random.default_rng(3)
    model = _linear_model(rng)
    make = _token_rows(rng)
    np.savez(tmp_path / "calib.npz", x=make(200))
    held = make(40)
    free, _ = compress(model, rank="6", round_to=1)
    aware, report = compress(model, rank="6", round_to=1, calib=str(tmp_path / "calib.npz"))
    assert report.replaced and report.replaced[0].weight_rel_error is not None
    assert _rel(aware, model, [{"x": held}]) < 0.5 * _rel(free, model, [{"x": held}])


def test_cli_flags_map_onto_the_config(tmp_path):
    args = build_parser().parse_args(["compress", "m.onnx", "-o", "o.onnx", "--calib", "d.npz", "--calib-samples",
                                      "50", "--calib-mode", "symmetric"])
    config = _compress_config(args)
    assert (config.calib, config.calib_samples, config.calib_mode) == ("d.npz", 50, "symmetric")
    default = _compress_config(build_parser().parse_args(["compress", "m.onnx", "-o", "o.onnx", "--calib", "d.npz"]))
    assert default.calib_mode == "asymmetric" and default.calib_samples is None
    with pytest.raises(OnnxlrError, match="calib-samples"):
        compress(cnn_model(0), calib="d.npz", calib_samples=0)
    with pytest.raises(OnnxlrError, match="no such file"):
        compress(cnn_model(0), calib=str(tmp_path / "missing.npz"))


def _masked_linear_model(rng, k=16, hidden=24, out=12):
    """x [b, seq, k], attention_mask [b, seq] -> MatMul, Relu, MatMul -> y * mask: the outputs of
    padding positions are zeroed, so only real tokens matter (as in a mean-pooled encoder)."""
    w1 = rng.standard_normal((k, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, out)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y0"], name="mm2"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]), helper.make_node("Mul", ["y0", "m3"], ["y"])]
    graph = helper.make_graph(
        nodes, "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", out])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_padding_tokens_are_left_out_of_the_statistics(tmp_path):
    """Sentences padded to a fixed length: the padding rows (large, differently distributed
    vectors the model masks out) must not steer the fit. With attention_mask found automatically,
    the error on real tokens is far lower than with --calib-mask none."""
    rng = np.random.default_rng(5)
    model = _masked_linear_model(rng)
    tokens = _token_rows(rng, width=16, seq=12)

    def make(n):
        x = tokens(n)
        lengths = rng.integers(2, 5, size=n)
        mask = (np.arange(x.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        x[mask == 0] = 5.0 * rng.standard_normal((int((mask == 0).sum()), 16))  # padding garbage
        return {"x": x, "attention_mask": mask}

    np.savez(tmp_path / "calib.npz", **make(300))
    held = make(60)
    options = {"rank": "4", "round_to": 1, "calib": str(tmp_path / "calib.npz")}
    masked, report = compress(model, **options)
    unmasked, _ = compress(model, calib_mask="none", **options)
    assert "padding rows left out by input 'attention_mask'" in " ".join(report.model_notes)
    assert _rel(masked, model, [held]) < 0.6 * _rel(unmasked, model, [held])  # measured 0.47
    with pytest.raises(OnnxlrError, match="--calib-mask 'tokens_mask': the model has no such input"):
        compress(model, calib_mask="tokens_mask", **options)
