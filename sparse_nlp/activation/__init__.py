"""Dynamic activation sparsity (TEAL, CATS): calibrated per-token thresholds, applied by hooks, saved in config.json.

See `sparse_nlp.activation.apply` for calibration and hooks and `sparse_nlp.activation.runtime` for the batch-1
kernel that skips the weight rows of zeroed inputs.
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
from .runtime import ActivationLinear, accelerate, revert

__all__ = [
    "ActivationLinear",
    "ActivationMethod",
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
