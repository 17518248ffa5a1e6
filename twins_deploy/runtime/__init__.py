"""Torch-free runtime: predictions from an exported ONNX file with numpy, pillow and onnxruntime only
(or from an OpenVINO IR, ``.xml``, with numpy, pillow and openvino only).

    from twins_deploy.runtime import Predictor
    predictor = Predictor("svt-s.onnx")            # providers: TensorRT, CUDA, CPU, whichever are installed
    best = predictor.predict("cat.jpg")            # a Prediction: class_ids, names, probs, logits
    batch = predictor.predict([path, jpeg_bytes, pil_image])
"""
from twins_deploy.runtime.predictor import Prediction, Predictor
from twins_deploy.runtime.session import create_session, default_providers, session_metadata

__all__ = ["Prediction", "Predictor", "create_session", "default_providers", "session_metadata"]
