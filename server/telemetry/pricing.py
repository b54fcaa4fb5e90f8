"""Prices of node types in dollars per hour, for the cost of inference; a YAML or JSON file extends them."""

from __future__ import annotations

import json
from pathlib import Path

# On-demand list prices, rounded; override them with --prices for your contract.
DEFAULT_PRICES_PER_HOUR: dict[str, float] = {
    "cpu": 0.10,  # a 2-vCPU general-purpose VM
    "gpu-t4": 0.35,
    "gpu-v100": 2.48,
    "gpu-a100": 3.67,
    "tpu-v3-8": 4.00,
}


def load_prices(path: Path | None) -> dict[str, float]:
    """The default table, updated by a file of {node_type: dollars_per_hour}."""
    prices = dict(DEFAULT_PRICES_PER_HOUR)
    if path is None:
        return prices
    text = Path(path).read_text()
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a prices file maps node types to dollars per hour, e.g. {{gpu-l4: 0.71}}")
    for node_type, price in data.items():
        if not isinstance(price, (int, float)) or isinstance(price, bool) or price < 0:
            raise ValueError(f"{path}: price of '{node_type}' must be a number of dollars per hour >= 0, got {price!r}")
        prices[str(node_type)] = float(price)
    return prices


def price_of(node_type: str, prices: dict[str, float]) -> float:
    try:
        return prices[node_type]
    except KeyError:
        known = ", ".join(sorted(prices))
        raise ValueError(f"node type '{node_type}' has no price (known: {known}); add it with --prices FILE") from None
