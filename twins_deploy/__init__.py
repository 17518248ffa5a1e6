"""twins-deploy: Twins vision transformers from PyTorch to ONNX, TensorRT and production.

Importing the package pulls in nothing heavy: ``twins_deploy.runtime`` must work with only numpy,
pillow and onnxruntime installed.
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    """``twins_deploy.export_onnx`` without importing torch when the package is imported."""
    if name == "export_onnx":
        from twins_deploy.exporters import export_onnx

        return export_onnx
    raise AttributeError(f"module 'twins_deploy' has no attribute {name!r}")
