"""Model adapters behind one protocol (``models.base.ModelAdapter``): torch and ONNX.

List layers, apply a policy reversibly, observe activations, export; never drive a sweep.
May import: ``data`` (the demo networks), ``quant``."""
