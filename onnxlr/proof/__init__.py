"""Proof: agreement (verify) and measured speed (bench) with onnxruntime."""
