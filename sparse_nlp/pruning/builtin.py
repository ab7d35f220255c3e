"""Imports every built-in pruning method so that each registers itself (one line per method module)."""

from . import (  # noqa: F401  (importing a method module registers its methods)
    methods,  # magnitude
    movement,  # movement (training-time; sparse_nlp.training.GradualPruner)
    sparsegpt,  # sparsegpt
    wanda,  # wanda
)
