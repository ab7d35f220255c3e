"""Sparse attention (token-to-token coupling): patterns, registration with transformers, kernels."""
