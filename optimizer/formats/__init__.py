"""Model formats and conversions: .pt2 loading and export to ONNX, ONNX to torch, graph facts, trainable modules and layers."""
