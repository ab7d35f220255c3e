"""Weight pruning (neuron-to-neuron coupling): patterns, scores, mask selection, mask keeping."""
