"""The Grafana dashboards deploy/generate.py writes: PromQL and panel builders (`builders`), one module per dashboard."""
