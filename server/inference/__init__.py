"""The data plane and what it serves: loaded models, their loader, the router, shadows, classification, shared memory and model config."""
