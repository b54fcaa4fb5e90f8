"""Every pass module; importing this package registers them all in optimizer.base.PASSES."""
