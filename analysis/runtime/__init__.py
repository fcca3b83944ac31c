"""The quantized onnxruntime model a policy ships as: build, latency, verify (the ground truth).

May import: ``models``, ``data``, ``store``, ``quant``."""
