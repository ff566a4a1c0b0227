"""Export for deployment: an all-or-nothing folder of ``model.safetensors`` + ``model.json`` (+ ``model.pt2``,
``model.onnx``) (:mod:`robust.export.folder`), the ONNX file checked in onnxruntime (:mod:`robust.export.onnx`)."""

from robust.export.folder import export_model

__all__ = ["export_model"]
