"""Torch-free runtime: predictions from an exported ONNX file with numpy, pillow and onnxruntime only."""
