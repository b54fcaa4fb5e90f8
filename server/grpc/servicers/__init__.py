"""gRPC servicers: thin adapters that decode a request, call the domain, and encode the answer."""
