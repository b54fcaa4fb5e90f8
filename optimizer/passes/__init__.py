"""The passes, one module per family; slimserve.optimizer.catalog lists the built-in modules and imports them on first use."""
