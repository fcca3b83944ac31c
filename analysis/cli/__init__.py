"""The ``quantlens`` command line: one module per group of verbs.

May import: everything in ``analysis``."""
