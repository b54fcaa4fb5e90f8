"""Every pass module; importing this package registers them all in optimizer.base.PASSES."""

from optimizer.passes import graph  # noqa: F401
from optimizer.passes import quantize  # noqa: F401
