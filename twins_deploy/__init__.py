"""twins-deploy: Twins vision transformers from PyTorch to ONNX, TensorRT and production.

Importing the package pulls in nothing heavy: ``twins_deploy.runtime`` must work with only numpy,
pillow and onnxruntime installed.
"""
__version__ = "0.1.0"
