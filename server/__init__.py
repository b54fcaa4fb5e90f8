"""The slimserve server: repository, runtimes, data plane, gRPC servicers and the `slimserve` command."""

__version__ = "0.1.0"
