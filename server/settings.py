"""Server settings, declared once: defaults that run with zero set-up, SLIMSERVE_* environment variables, flags, the docs table.

Each field of `Settings` is one setting: `slimserve start` makes a flag of it (server/cli.py), pydantic-settings
reads `SLIMSERVE_<NAME>`, and `settings_table()` renders the docs' settings reference from it at every build of the
site (docs/hooks/reference.py). Adding a setting is adding one field here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from slimserve.server.batching.assembly import BatchingConfig
from slimserve.server.management.throttle import parse_job_yield
from slimserve.server.runtimes import RuntimeConfig
from slimserve.server.telemetry.statistics import DEFAULT_FEEDBACK_IDS

DEVICES = ("auto", "cpu", "cuda")


def setting(default: Any = None, description: str = "", *, shown: str | None = None, **constraints: Any) -> Any:
    """A settings field: `description` is the flag's help and the docs' meaning (markdown code spans allowed);
    `shown` is the default as people read it where the value itself says little (64 MiB, cores ÷ compute threads)."""
    extra = {"shown": shown} if shown is not None else None
    if callable(default):
        return Field(default_factory=default, description=description, json_schema_extra=extra, **constraints)
    return Field(default, description=description, json_schema_extra=extra, **constraints)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIMSERVE_", extra="ignore")

    repository: Path = setting(Path("./slimserve-repository"), "repository directory", shown="`./slimserve-repository`")
    host: str = setting("127.0.0.1", "address the gRPC, HTTP and `/metrics` servers listen on")
    grpc_port: int = setting(8001, "gRPC port; 0 picks a free one")
    http_port: int = setting(
        8000,
        "the Open Inference Protocol over HTTP/REST (KServe v2, Triton's binary tensors; same token, TLS and models as "
        "gRPC); 0 picks a free port, `-1` disables it",
        ge=-1,
    )
    reuse_port: bool = setting(
        False,
        "let several processes listen on one gRPC port (SO_REUSEPORT; the kernel spreads connections among them); off: a "
        "busy `--grpc-port` stops the start",
    )
    metrics_port: int = setting(8002, "Prometheus text format at `/metrics` over HTTP; 0 picks a free port, `-1` disables it")
    node_type: str = setting("cpu", "node type label for metrics and cost (cpu, gpu-v100, tpu-v3-8, ...)")
    server_name: str = setting(
        "slimserve", "the name ServerMetadata answers on both ports; tools and scripts that check for Triton's own name need 'triton'"
    )
    token_file: Path | None = setting(
        None, "file with the bearer token: management calls (and `RepositoryModelLoad/Unload`) require `authorization: Bearer <token>`"
    )
    protect_inference: bool = setting(False, "inference requires the token too")
    max_message_bytes: int = setting(64 * 1024 * 1024, "largest gRPC message accepted or sent", shown="64 MiB")
    max_upload_bytes: int = setting(4 * 1024**3, "largest total upload (model plus data files)", shown="4 GiB")
    compute_threads: int = setting(2, "worker threads that run models")
    intra_op_threads: int = setting(
        0,
        "threads inside one model call (ORT's idle workers never spin); 0: chosen per variant at load and logged: ONNX Runtime "
        "on the CPU times a batch-1 call and takes all cores when the call is over 1 ms of CPU and they shorten it 1.3x or "
        "more, else 1 thread; torch and GPU providers: the cores divided among the compute threads",
        shown="measured per variant",
        ge=0,
    )
    device: str = setting("auto", "`auto` (or `cuda`) picks TensorRT/CUDA when present, else the CPU; `cpu` forces the CPU")
    batching: bool = setting(True, "dynamic batching per variant (inputs need a free batch dimension, else that variant runs unbatched)")
    max_batch_size: int = setting(32, "largest merged batch, in samples")
    max_queue_delay_ms: float = setting(0.5, "longest a request waits for others while a second call slot is free")
    preferred_batch_sizes: list[int] = setting(list, "batch sizes to cut at when they can be filled (repeat the flag)")
    max_queue_size: int = setting(1024, "requests waiting per variant; beyond it `RESOURCE_EXHAUSTED` at once")
    inline_compute_ms: float = setting(
        0.5,
        "ONNX Runtime CPU calls (a batch, or one request with `--no-batching`) whose recent mean compute is below this "
        "run on the event-loop thread instead of a compute thread (the hand-off costs more than a tiny model's call); "
        "0: always hand off",
        ge=0,
    )
    max_concurrent_calls: int = setting(
        2,
        "model calls of one variant at once (as many as the compute threads by default: a model whose batches cost as much "
        "per sample as single calls then still uses every core); requests gather behind them, `--max-queue-delay-ms` applies",
        ge=1,
    )
    unload_idle_variants_s: float = setting(
        0.0,
        "variants that no route serves (no traffic weight, not a shadow, not in a running rollout) stay out of memory: not "
        "loaded at start, unloaded after this many seconds without a request; a request that pins one (`model_version`) waits "
        "while it loads; 0: every ready variant stays loaded",
        ge=0,
    )
    feedback_ids: int = setting(
        DEFAULT_FEEDBACK_IDS,
        "requests per model whose answers are kept for a later label (`slimctl feedback`), the newest; each costs about "
        "0.2-0.3 KB (20-26 MiB per model at the default once that many requests were served: python -m bench.bench_feedback_memory)",
        ge=1,
    )
    tls_cert: Path | None = setting(None, "PEM certificate chain of the server: serve gRPC (and HTTPS) over TLS")
    tls_key: Path | None = setting(None, "PEM private key of `--tls-cert`")
    tls_ca: Path | None = setting(None, "with TLS: require client certificates signed by this PEM CA bundle (mutual TLS)")
    read_only: bool = setting(False, "serve a repository another slimserve writes (replicas on shared storage); writes are refused")
    poll_repository_s: float = setting(0.0, "seconds between checks for models the writer changed; changes load live; 0: never")
    rollout_interval_s: float = setting(
        5.0, "seconds between the rollout controller's looks at its gates (any look is valid: the tests are anytime-valid)", gt=0
    )
    prometheus_url: str | None = setting(
        None,
        "Prometheus that scrapes every replica (`http://host:9090`): the rollout controller reads the arms' requests, errors, "
        "feedback and latency histograms there, summed over replicas; none: this process's own traffic only",
        pattern=r"^https?://[^\s/]+(/\S*)?$",
    )
    prices: Path | None = setting(
        None,
        "YAML/JSON of node type → dollars per hour, extending cpu 0.10, gpu-t4 0.35, gpu-v100 2.48, gpu-a100 3.67, tpu-v3-8 4.00",
        shown="built in",
    )
    shutdown_grace_s: float = setting(30.0, "seconds in-flight calls get to finish on SIGTERM")
    model_repository: Path | None = setting(
        None,
        "a Triton-layout model repository (`<model>/config.pbtxt`, `<model>/<version>/model.onnx`, label files) served as it "
        "is: each model is imported into `--repository` with its config, labels and version numbers",
    )
    model_control_mode: str = setting(
        "none",
        "with `--model-repository`, as Triton's: `none` loads every model at start, `explicit` only those a "
        "RepositoryModelLoad names, `poll` also imports and reloads a changed model directory",
        pattern=r"^(none|explicit|poll)$",
    )
    repository_poll_secs: float = setting(15.0, "with `--model-control-mode poll`: seconds between checks of `--model-repository`", gt=0)
    trace_endpoint: str | None = setting(
        None,
        "OTLP/HTTP collector (`http://host:4318`) that receives a span per stage of traced requests (receive, route, queue, "
        "compute, shadow, respond); none: no spans. An unreachable one never slows a request: its spans are dropped and counted",
        pattern=r"^https?://[^\s/]+(/\S*)?$",
    )
    trace_rate: int = setting(1000, "with `--trace-endpoint`: one request in N is traced (Triton's trace_rate; 1 traces every one)", ge=1)
    # ---- optimizer jobs: each in a worker away from the serving process (server/management/runners.py)
    job_runner: str = setting(
        "local",
        "where optimizer jobs run: `local` (a worker process per job on this node) or `ray://HOST:PORT` (a task per job on that "
        "Ray cluster, through its client server, port 10001 by default; needs `slimserve[ray]`) or `ray+gcs://HOST:PORT` (the "
        "same through the cluster's GCS, port 6379 by default, from a host that is a node of the cluster); an unreachable "
        "cluster stops the start",
        pattern=r"^(local|ray(\+gcs)?://[^\s/:]+:\d+)$",
    )
    max_jobs: int = setting(1, "optimizer jobs that run at once; the others wait in a queue (`slimctl jobs` shows them `queued`)", ge=1)
    optimizer_threads: int = setting(
        0,
        "torch and ONNX Runtime threads of one job's worker; 0: the cores the serving compute threads leave, at least 1",
        shown="cores − compute threads, ≥ 1",
        ge=0,
    )
    job_nice: int = setting(
        19,
        "niceness a local worker adds to itself, so that serving threads win the cores (0-19; at 19 also SCHED_IDLE: it runs "
        "only when the server's CPU group leaves a core idle, so lower it where other busy work shares that group)",
        ge=0,
        le=19,
    )
    job_memory_mb: int = setting(
        0, "resident memory a local job's worker (with its helpers) may use, in MiB; over it the job fails naming the cap; 0: no cap", ge=0
    )
    job_yield: str = setting(
        "auto",
        "while serving is busy (see --job-yield-busy), a local job's worker runs this fraction of the time and is stopped the "
        "rest: `auto` adapts it to what serving loses (down to 5%), a number (`0.25`) fixes it, `off` never stops it; "
        "`slimctl jobs` shows such a job 'paused for traffic'",
    )
    job_yield_busy: float = setting(
        0.5,
        "requests in flight on average over the last second (or, while requests are answered, cores the server process "
        "used over it) from which serving counts as busy for --job-yield",
        gt=0,
    )
    job_cpus: float = setting(1.0, "CPUs each job declares on a Ray cluster", gt=0)
    job_gpus: float = setting(0.0, "GPUs each job declares on a Ray cluster", ge=0)

    @field_validator("job_yield")
    @classmethod
    def _job_yield(cls, value: str) -> str:
        parse_job_yield(value)  # raises saying what --job-yield takes
        return value

    def batching_config(self) -> BatchingConfig:
        return BatchingConfig(
            enabled=self.batching,
            max_batch_size=self.max_batch_size,
            max_queue_delay_ms=self.max_queue_delay_ms,
            preferred_batch_sizes=tuple(self.preferred_batch_sizes),
            max_queue_size=self.max_queue_size,
        )

    def runtime_config(self) -> RuntimeConfig:
        return RuntimeConfig(
            intra_op_threads=self.intra_op_threads,
            threads_per_call=self.auto_intra_op_threads(),
            device=self.device,
            keep_threads=not self.read_only,
        )

    def job_threads(self) -> int:
        """A job worker's thread cap: `--optimizer-threads`, or the cores the serving compute threads leave (at least 1)."""
        if self.optimizer_threads:
            return self.optimizer_threads
        return max(1, (os.cpu_count() or 1) - self.compute_threads)

    def auto_intra_op_threads(self) -> int:
        """Cores shared out among the compute threads: the threads of a call where nothing is measured (torch, GPU providers).

        On 2 cores with 2 compute threads that is 1 thread per call: measured on the digits CNN, it
        halves the server's CPU per request against ORT's default of one thread per core.
        """
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(1, self.compute_threads))


def flag_of(name: str, field: FieldInfo) -> str:
    """The flag of a setting: `--name`; an on/off pair for what is on by default, a switch for what is off."""
    flag = "--" + name.replace("_", "-")
    if field.annotation is bool and field.default is True:
        return f"{flag}/--no-{flag[2:]}"
    return flag


def shown_default(field: FieldInfo) -> str:
    """The default as the docs and `--help` show it (markdown code spans)."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "shown" in extra:
        return str(extra["shown"])
    default = field.get_default(call_default_factory=True)
    if default is None or default == []:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"`{default}`"


def settings_table() -> str:
    """The docs' "Server settings" table (docs/reference/settings.md): one row per setting, in declaration order."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{flag_of(name, field)}` | {shown_default(field)} | {meaning} |")
    return "\n".join(rows) + "\n"
