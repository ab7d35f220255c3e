"""The version of sparse_nlp (also in pyproject.toml); recorded in every checkpoint's metadata."""

__version__ = "0.1.0"
