"""TensorRT conversion: engine plans built from the pipeline's ONNX files, on the GPU they will serve on.

    build.py      the builder (`normfuse convert --backend tensorrt`): one plan per variant, reused when it matches
    precision.py  the FP16 precision-annotated ONNX the fp16 plans parse (statistics kept in float32; runs on CPU)
    parity.py     every plan gated against ONNX Runtime on the conversion's held-out inputs
    int8.py       the int8 (QDQ) variant's plan, gated on its own accuracy record

TensorRT itself is imported lazily inside the functions that need it, so `import convert.tensorrt` works
without it.
"""
