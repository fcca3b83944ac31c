"""The sweep: plan jobs, drive any adapter through them, statistics, result tables, executors, resume.

May import: ``models``, ``data``, ``store``, ``quant``."""
