"""The gRPC transport: servicers, the protobuf converters, the error edge and authentication."""
