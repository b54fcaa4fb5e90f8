"""What the server measures and shows: Prometheus metrics, per-variant recording, live statistics, significance tests, prices and log settings."""
