"""The passes, one module per family; optimizer.registry lists the built-in modules and imports them on first use."""
