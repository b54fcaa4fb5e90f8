"""The passes, one module per family; slimserve.optimizer.catalog.PASSES names each pass's `module:Class` and imports its module on first use."""
