"""Engines: one small runner interface (load / infer / close) over ONNX Runtime, TensorRT and PyTorch.

Heavy backends are imported lazily: `import engines` needs neither TensorRT nor CUDA.
"""

from engines.base import DATATYPES, Engine, EngineError, InputError, TensorSpec, check_inputs

__all__ = ["DATATYPES", "Engine", "EngineError", "InputError", "TensorSpec", "check_inputs"]
