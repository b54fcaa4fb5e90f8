#!/usr/bin/env python3
"""Container health probe: asks slimserve's grpc.health.v1 service; exit 0 when SERVING, 1 otherwise.

Usage: slimserve-healthcheck [--address HOST:PORT] [--service NAME] [--timeout SECONDS]
                             [--tls-ca PEM [--tls-cert PEM --tls-key PEM] [--tls-server-name NAME]]
The address defaults to 127.0.0.1:$SLIMSERVE_GRPC_PORT (8001); the service to "" (the whole server).
A server started with --tls-cert needs --tls-ca (env SLIMSERVE_HEALTHCHECK_TLS_CA), and with
--tls-ca (mutual TLS) a client certificate too (SLIMSERVE_HEALTHCHECK_TLS_CERT / _KEY); the name
its certificate was issued for goes in --tls-server-name when it is not the address's host.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=f"127.0.0.1:{os.environ.get('SLIMSERVE_GRPC_PORT', '8001')}")
    parser.add_argument("--service", default="", help='e.g. "inference.GRPCInferenceService"; "" checks the server')
    parser.add_argument("--timeout", type=float, default=2.0)
    env = os.environ.get
    parser.add_argument("--tls-ca", default=env("SLIMSERVE_HEALTHCHECK_TLS_CA"), help="PEM CA of the server's certificate")
    parser.add_argument("--tls-cert", default=env("SLIMSERVE_HEALTHCHECK_TLS_CERT"), help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default=env("SLIMSERVE_HEALTHCHECK_TLS_KEY"), help="PEM key of --tls-cert")
    parser.add_argument("--tls-server-name", default=env("SLIMSERVE_HEALTHCHECK_TLS_SERVER_NAME"))
    args = parser.parse_args(argv)
    try:
        with open_channel(args) as channel:
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
