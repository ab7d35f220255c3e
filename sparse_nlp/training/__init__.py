"""Training with sparsity: distillation from the dense teacher, Trainer callbacks, accelerate loop helpers."""
