"""Dynamic batching: what a batch is (assembly), how large one pays (sizing), and the batcher of a variant."""
