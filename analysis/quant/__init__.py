"""Quantization itself: format specs and their registry, quantize/dequantize/fake-quant, observers, sizes.

The lowest layer: imports nothing else from ``analysis`` but ``analysis.errors``."""
