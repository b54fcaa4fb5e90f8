"""What a model file holds: bytes on disk, parameters and non-zeros, FLOPs per sample, for ONNX and torch.export programs."""
