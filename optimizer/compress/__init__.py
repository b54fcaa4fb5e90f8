"""Model surgery the passes share: channel pruning, transformer heads and FFNs, students, ONNX Runtime quantization helpers."""
