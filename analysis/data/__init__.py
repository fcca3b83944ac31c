"""Tasks: the inputs a model is fed, labels, metrics, and the bundled demos (data with their networks).

May import: ``quant``."""
