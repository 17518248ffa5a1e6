"""Batch inference past one machine, on Ray Data: every input answered exactly once, even when a worker dies.

    import ray
    from twins_deploy.batch import infer_dataset

    ray.init(address="auto")
    images = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)   # "bytes" and "path"
    predictions = infer_dataset("svt-s-224x224.onnx", images, topk=5, workers=16)     # lazy, like any Dataset
    predictions.write_parquet("s3://bucket/predictions/")

``twins-deploy infer --ray [ADDRESS]`` runs the same pipeline from the command line (``run_job``).
Ray is imported when a job starts, so the package imports without it.
"""
from twins_deploy.batch.dataset import infer_dataset
from twins_deploy.batch.inputs import list_inputs
from twins_deploy.batch.job import JobReport, run_job
from twins_deploy.batch.worker import EnginePackage

__all__ = ["EnginePackage", "JobReport", "infer_dataset", "list_inputs", "run_job"]
