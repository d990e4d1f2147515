"""MOSAIC: closed-loop, budget-constrained curation of alignment training data."""

__version__ = "0.1.0"
