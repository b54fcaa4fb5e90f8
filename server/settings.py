"""Server settings: defaults that run with zero set-up, SLIMSERVE_* environment variables, then flags."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.batching import BatchingConfig
from server.runtimes import RuntimeConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIMSERVE_", extra="ignore")

    repository: Path = Field(Path("./slimserve-repository"), description="directory of the embedded repository")
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_port: int = Field(8002, description="Prometheus /metrics over HTTP; 0 picks a free port, -1 disables it")
    node_type: str = Field("cpu", description="node type label for metrics and cost (cpu, gpu-v100, tpu-v3-8, ...)")
    prices: Path | None = Field(None, description="YAML/JSON file of node type -> dollars per hour, extending the built-in table")
    token_file: Path | None = Field(None, description="file with the bearer token management calls must carry")
    protect_inference: bool = Field(False, description="require the token for inference calls too")
    tls_cert: Path | None = Field(None, description="PEM certificate chain of the server: serve gRPC over TLS")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_ca: Path | None = Field(None, description="PEM CA bundle: clients must present a certificate it signed (mutual TLS)")
    max_message_bytes: int = Field(64 * 1024 * 1024, description="largest gRPC message accepted or sent")
    max_upload_bytes: int = Field(4 * 1024**3, description="largest total upload (model plus data files)")
    compute_threads: int = Field(2, description="worker threads that run models")
    intra_op_threads: int = Field(0, description="threads inside one model call; 0: the cores divided among the compute threads")
    device: str = Field("auto", description="auto (best available), cpu, or cuda")
    batching: bool = Field(True, description="merge concurrent requests of a variant into batched model calls")
    max_batch_size: int = Field(32, description="largest batch the batcher forms (samples)")
    max_queue_delay_ms: float = Field(0.5, description="longest a request waits for others to fill a batch")
    preferred_batch_sizes: list[int] = Field(default_factory=list, description="batch sizes to cut at when they can be filled")
    max_queue_size: int = Field(1024, description="requests waiting per variant; beyond it RESOURCE_EXHAUSTED")
    inline_compute_ms: float = Field(
        0.5, ge=0, description="ONNX Runtime CPU calls (batches, or single requests with batching off) whose recent mean compute is below this run on the event-loop "
        "thread, skipping the hand-off to a compute thread; 0: always hand off"
    )
    max_concurrent_calls: int = Field(1, ge=1, description="model calls of one variant running at once (batches fill behind them)")
    read_only: bool = Field(False, description="serve a repository another server writes (replicas on shared storage)")
    poll_repository_s: float = Field(0.0, description="seconds between checks for models changed by another server; 0: never")
    shutdown_grace_s: float = Field(30.0, description="seconds in-flight calls get to finish on SIGTERM")

    def batching_config(self) -> BatchingConfig:
        return BatchingConfig(
            enabled=self.batching,
            max_batch_size=self.max_batch_size,
            max_queue_delay_ms=self.max_queue_delay_ms,
            preferred_batch_sizes=tuple(self.preferred_batch_sizes),
            max_queue_size=self.max_queue_size,
        )

    def runtime_config(self) -> RuntimeConfig:
        return RuntimeConfig(intra_op_threads=self.intra_op_threads or self.auto_intra_op_threads(), device=self.device)

    def auto_intra_op_threads(self) -> int:
        """Cores shared out among the compute threads, so that concurrent model calls do not oversubscribe the node.

        On 2 cores with 2 compute threads that is 1 thread per call: measured on the digits CNN, it
        halves the server's CPU per request against ORT's default of one thread per core.
        """
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(1, self.compute_threads))
