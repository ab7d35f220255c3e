"""Evaluation: real data sets (local folder or Hub), task metrics, quality helpers."""
