"""The optimizer: passes, recipes, fine-tuning, evaluation and reports. A pure library: no server, no gRPC."""
