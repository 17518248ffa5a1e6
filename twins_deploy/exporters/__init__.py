"""Exporters: from the PyTorch Twins to deployable graphs (ONNX), checked against PyTorch."""
from twins_deploy.exporters.onnx import (
    ExportReport, OnnxExportSpec, export_onnx, save_onnx_atomic, validate_model_outputs,
)

__all__ = ["ExportReport", "OnnxExportSpec", "export_onnx", "save_onnx_atomic", "validate_model_outputs"]
