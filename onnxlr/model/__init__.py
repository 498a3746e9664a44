"""The only protobuf code: model files, queries, edits, opsets, targets and splicing.

    io       load (lazy external data), check, atomic saves, temp files, deferred signals
    query    graphs and subgraphs, constants, uses, names, shapes
    edit     replace a node by a chain, expose tensors as outputs, fold constant weights
    opset    what onnxruntime runs, version conversion
    targets  which Conv/Gemm/MatMul nodes can be factorized, as plain layers (or why not)
    splice   a replacement chain (plain steps) -> nodes in place of its layer; biases
"""

from onnxlr.model.edit import (
    fold_constant_weights,
    make_initializer,
    remove_unused_constants,
    replace_node,
)
from onnxlr.model.io import (
    PROTOBUF_LIMIT,
    check_model,
    check_writable,
    has_lazy_tensors,
    load_model,
    materialize_external,
    save_model_atomic,
    tensor_to_array,
    writable_data_folder,
    write_text_atomic,
)
from onnxlr.model.opset import check_runtime_opset, convert_opset, default_opset, runtime_max_opset
from onnxlr.model.query import (
    ConstantSource,
    NameScope,
    all_names,
    constants_in,
    count_uses,
    expose_outputs,
    infer_shapes,
    iter_graphs,
    runtime_shapes,
)

__all__ = [
    "PROTOBUF_LIMIT", "ConstantSource", "NameScope", "all_names", "check_model", "check_runtime_opset",
    "check_writable", "constants_in", "convert_opset", "count_uses", "default_opset", "expose_outputs",
    "fold_constant_weights", "has_lazy_tensors", "infer_shapes", "iter_graphs", "load_model",
    "make_initializer", "materialize_external", "remove_unused_constants", "replace_node",
    "runtime_max_opset", "runtime_shapes", "save_model_atomic", "tensor_to_array", "writable_data_folder",
    "write_text_atomic",
]
