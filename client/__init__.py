"""The slimserve SDK: tensor codec, a typed Python client and the `slimctl` command (no torch, no onnxruntime)."""
