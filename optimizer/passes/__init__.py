"""Every pass module; importing this package registers them all in optimizer.base.PASSES."""

from optimizer import auto  # noqa: F401  (the auto recipe's placeholder pass)
from optimizer.passes import distill  # noqa: F401
from optimizer.passes import graph  # noqa: F401
from optimizer.passes import prune  # noqa: F401
from optimizer.passes import quantize  # noqa: F401
