"""The slimserve server: repository, runtimes, data plane, gRPC servicers and the `slimserve` command."""
