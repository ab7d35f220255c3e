"""Dynamic activation sparsity (TEAL, CATS thresholds; MoEfication experts): calibrated, applied by hooks, saved in
config.json.

See `sparse_nlp.activation.apply` for calibration and hooks and `sparse_nlp.activation.runtime` for the batch-1
paths that skip the weight rows of zeroed inputs and the skipped experts.
"""

from .apply import (
    activation_record,
    activation_state,
    attach_thresholds,
    calibrate_activation,
    check_activation,
    remove_activation,
    restore_activation,
)
from .methods import ActivationMethod, get_activation_method
from .runtime import ActivationLinear, ExpertRowsLinear, accelerate, revert

__all__ = [
    "ActivationLinear",
    "ActivationMethod",
    "ExpertRowsLinear",
    "accelerate",
    "activation_record",
    "activation_state",
    "attach_thresholds",
    "calibrate_activation",
    "check_activation",
    "get_activation_method",
    "remove_activation",
    "restore_activation",
    "revert",
]
