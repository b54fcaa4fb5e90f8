#!/usr/bin/env python3
"""Container health probe: asks slimserve's grpc.health.v1 service; exit 0 when SERVING, 1 otherwise.

Usage: slimserve-healthcheck [--address HOST:PORT] [--service NAME] [--timeout SECONDS]
The address defaults to 127.0.0.1:$SLIMSERVE_GRPC_PORT (8001); the service to "" (the whole server).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=f"127.0.0.1:{os.environ.get('SLIMSERVE_GRPC_PORT', '8001')}")
    parser.add_argument("--service", default="", help='e.g. "inference.GRPCInferenceService"; "" checks the server')
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    try:
        with grpc.insecure_channel(args.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"unhealthy: {args.address} service '{args.service}': {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.address} service '{args.service}' is {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
