"""The Ray side of `--job-runner ray://HOST:PORT` and `ray+gcs://HOST:PORT`: a Ray driver in a process of its own.

Ray never runs inside the server. `runners.RayRunner` starts `python -m slimserve.server.management.ray_driver FD`
per job (and once at the server's start, to probe the cluster), hands it a `RayOrder` (pickled) on stdin, and
reads the same messages a local worker sends on the pipe FD: `("progress", ProgressEvent)`, then `("done", ...)`
or `("failed", kind, message)`. Why a process: a Ray driver's core worker aborts its whole process when it loses
the cluster for a minute (`Failed to connect to GCS ...`), Ray Client's connection may fail at random (its proxier
forks a server per client while gRPC runs: ray-project/ray#63202), and `ray.init` owns process-wide state (signal
handlers, one connection per process). A process per job keeps all of that away from the serving process; when
the driver dies, Ray ends the job's tasks with it.

Two ways in, as Ray itself offers them:
- `ray://HOST:PORT`: Ray Client, through the head's client server (port 10001 by default), from anywhere.
  The connection is tried `CLIENT_ATTEMPTS` times (each is a fresh client, and the proxier's failure is per
  client). When every attempt fails and the cluster's head runs on this host (its client server's command line
  names the GCS), the driver joins through the GCS instead, saying so in the job's progress.
- `ray+gcs://HOST:PORT`: the GCS address `ray start --head` prints (port 6379 by default), as
  `ray.init(address="HOST:PORT")` takes it. A driver so connected joins through a raylet of its own host, so this
  host must be a node of the cluster (`ray start --address HOST:PORT` here); no client server is involved.

Token authentication: Ray (2.59 on) turns it on for a cluster started with `ray start --head` when a token exists
(`~/.ray/auth_token`, which that command writes), but a driver whose RAY_AUTH_MODE is unset connects without the
token and is refused, which Ray Client reports as a bare `ray client connection timeout` after 30 s (the cause of
every failed Ray run on the development machine). So the driver follows the rule Ray's head follows: RAY_AUTH_MODE
unset and a token available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) -> token mode. An explicit
RAY_AUTH_MODE in the server's environment is left as it is.

The job itself is `ray_job`, a Ray task: the model and data travel as bytes through the cluster, the variant's
files come back as bytes, and the driver writes them into the job's staging directory on this node.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from slimserve.server.management.worker import (
    WorkFailed,
    WorkLimits,
    WorkResult,
    WorkSpec,
    cap_threads,
    die_with_parent,
    failure_of,
    run_work,
)

SCHEMES = {"ray": "client", "ray+gcs": "gcs"}
CLIENT_ATTEMPTS = 3  # Ray Client connections tried before the GCS fallback or the refusal
LIVENESS_STRIKES = 3  # consecutive refused connections to the cluster's address (one a second) that end the job
AGAIN = "if the cluster stopped (`ray status` on its head), start it again and rerun the job: nothing was registered"


@dataclass(frozen=True)
class RayAddress:
    scheme: str  # "ray" (Ray Client) or "ray+gcs" (a driver through the GCS)
    host: str
    port: int

    @property
    def mode(self) -> str:
        return SCHEMES[self.scheme]

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_ray_address(address: str) -> RayAddress:
    """`ray://HOST:PORT` or `ray+gcs://HOST:PORT`; anything else is refused naming both forms."""
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in SCHEMES or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(
            "--job-runner must be 'local', 'ray://HOST:PORT' (a Ray cluster's client server, port 10001 by default) or "
            f"'ray+gcs://HOST:PORT' (its GCS, port 6379 by default, from a host that is a node of the cluster), got {address!r}"
        )
    return RayAddress(parts.scheme, parts.hostname, port)


def answers(host: str, port: int, timeout: float = 3.0) -> OSError | None:
    """None when something listens at host:port, else the error of the connection."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e


@dataclass(frozen=True)
class RayOrder:
    """What a driver process is asked: connect to `address` and run `spec` as a task (None: only probe the cluster)."""

    address: str
    spec: WorkSpec | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int = 0


# ---------------------------------------------------------------------------------------------- on the cluster


def ray_job(spec: WorkSpec, files: dict[str, bytes], events: Any = None) -> tuple[WorkResult, dict[str, bytes]]:
    """A job as a Ray task: the model and data arrive as bytes, the variant's files leave as bytes; progress goes
    into `events` (a ray.util.queue.Queue the driver drains), best effort: a full or lost queue never fails the job."""

    def progress(event: Any) -> None:
        if events is not None:
            with contextlib.suppress(Exception):
                events.put_nowait(event)

    with tempfile.TemporaryDirectory(prefix=f"slimserve-job-{spec.job_id}-") as tmp:
        root = Path(tmp)
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
        staged = root / "staged"
        staged.mkdir()
        local = replace(
            spec,
            source=root / "model" / spec.source.name,
            datasets={role: root / "data" / f"{role}.npz" for role in spec.datasets},
            staged=staged,
        )
        try:
            cap_threads(spec.limits.threads)
            result = run_work(local, progress)
        except BaseException as e:
            failed = failure_of(e, spec.limits)
            raise WorkFailed(failed.kind, failed.message) from None
        out = {p.name: p.read_bytes() for p in result.variant_dir.iterdir() if p.is_file()}
        return replace(result, variant_dir=Path("variant")), out


# ---------------------------------------------------------------------------------------------- the driver


def cmdlines() -> list[list[str]]:
    """The command lines of this host's processes (Linux /proc; empty elsewhere)."""
    out = []
    with contextlib.suppress(OSError):
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append([a.decode(errors="replace") for a in f.read().split(b"\0") if a])
    return out


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name=VALUE` or `--name VALUE` in a command line."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


def is_this_host(host: str) -> bool:
    """Whether `host` names this machine (loopback, or an address a socket here can bind)."""
    for ip in addresses(host):
        if ip.startswith("127.") or ip == "::1":
            return True
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
            return True
    return False


def same_host(a: str, b: str) -> bool:
    """Whether two host names are the same machine: the same addresses, or both this one (Ray writes a local head's
    GCS address with the node's IP, a user with 127.0.0.1)."""
    return a == b or bool(addresses(a) & addresses(b)) or (is_this_host(a) and is_this_host(b))


def local_raylet_of(address: RayAddress, processes: list[list[str]] | None = None) -> bool:
    """Whether a raylet of the cluster whose GCS is `address` runs on this host (a driver through the GCS needs one)."""
    for argv in cmdlines() if processes is None else processes:
        if not argv or not os.path.basename(argv[0]).startswith("raylet"):
            continue
        gcs = flag(argv, "--gcs-address") or ""
        host, _, port = gcs.rpartition(":")
        if port == str(address.port) and same_host(host, address.host):
            return True
    return False


def local_gcs_of_client(address: RayAddress, processes: list[list[str]] | None = None) -> str | None:
    """The GCS address of the cluster whose Ray Client server listens at `address` on this host (its proxier's command
    line names it), or None when that client server does not run here."""
    for argv in cmdlines() if processes is None else processes:
        if "ray.util.client.server" not in argv or flag(argv, "--mode") != "proxy":
            continue
        if flag(argv, "--port") == str(address.port) and (gcs := flag(argv, "--address")):
            return gcs
    return None


def token_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where Ray reads its token from when RAY_AUTH_TOKEN is not set."""
    return Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def use_token_if_available(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Sets RAY_AUTH_MODE=token (before Ray is imported) where it is unset and a token is available, as Ray's head
    does; returns whether the driver will send a token."""
    mode = environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    if environ.get("RAY_AUTH_TOKEN") or token_path(environ).is_file():
        environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def auth_hint(token: bool) -> str:
    if token:
        return (
            f"; the driver sent the token of {'RAY_AUTH_TOKEN' if os.environ.get('RAY_AUTH_TOKEN') else token_path()}: is it the cluster's?"
        )
    return (
        "; if the cluster uses token authentication (Ray 2.59+ turns it on for `ray start --head`), give this server its "
        "token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` on the head)"
    )


def connect(address: RayAddress, say: Callable[[str], None]) -> tuple[Any, RayAddress]:
    """`ray.init` through the client server or the GCS; returns ray and the address it joined through (a GCS one when
    the client server failed and the head runs here). Raises WorkFailed saying why it could not."""
    error = answers(address.host, address.port)
    if error is not None:
        raise WorkFailed("UNAVAILABLE", f"cannot reach the Ray cluster at {address} ({error.strerror or error}); {AGAIN}")
    token = use_token_if_available()
    import ray

    options: dict[str, Any] = {"log_to_driver": False}
    if address.mode == "gcs":
        if not local_raylet_of(address):
            raise WorkFailed(
                "FAILED_PRECONDITION",
                f"this host is not a node of the Ray cluster at {address}: a driver joins through the GCS only from a node "
                f"(run `ray start --address {address.host}:{address.port}` here first), or use the cluster's client "
                "server with --job-runner ray://HOST:10001",
            )
        try:
            ray.init(address=f"{address.host}:{address.port}", **options)
        except Exception as e:
            text = " ".join(str(e).split())[:300]
            raise WorkFailed(
                "UNAVAILABLE", f"the Ray cluster at {address} refused the driver: {type(e).__name__}: {text}{auth_hint(token)}"
            ) from None
        return ray, address
    failures = []
    for attempt in range(CLIENT_ATTEMPTS):
        try:
            ray.init(str(address), **options)
            return ray, address
        except Exception as e:  # ConnectionError, or "Starting Ray client server failed" (ray-project/ray#63202)
            failures.append(" ".join(f"{type(e).__name__}: {e}".split())[:300])
            with contextlib.suppress(Exception):
                ray.shutdown()
            if attempt + 1 < CLIENT_ATTEMPTS:
                time.sleep(1.0)
    gcs = local_gcs_of_client(address)
    if gcs is not None:
        host, _, port = gcs.rpartition(":")
        fallback = RayAddress("ray+gcs", host, int(port))
        if local_raylet_of(fallback):
            try:
                ray.init(address=gcs, **options)
                say(
                    f"Ray Client at {address} failed {CLIENT_ATTEMPTS} times ({failures[-1]}); joined the cluster through its GCS {fallback}"
                )
                return ray, fallback
            except Exception as e:
                failures.append(f"through the GCS {gcs}: {type(e).__name__}: {e}")
    raise WorkFailed(
        "UNAVAILABLE",
        f"the Ray cluster at {address} refused the connection {len(failures)} time(s) (last: {failures[-1]}){auth_hint(token)}; check "
        "`ray status` on its head; from a node of the cluster, --job-runner ray+gcs://HOST:6379 joins without the client server",
    )


def describe(ray: Any, joined: RayAddress) -> str:
    """What the cluster offers now (an autoscaling cluster may grow when a job asks for more)."""
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return (
        f"{nodes} node(s), {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU, "
        f"{resources.get('memory', 0) / 2**30:.1f} GiB (joined through {joined})"
    )


def submit(ray: Any, joined: RayAddress, order: RayOrder, progress: Callable[[Any], None], halt: threading.Event) -> WorkResult:
    """Runs the order's job as a task and writes its variant's files into the job's staging directory."""
    from ray.util.queue import Queue

    from slimserve.optimizer.base import ProgressEvent

    spec = order.spec
    assert spec is not None
    files = {f"model/{p.name}": p.read_bytes() for p in spec.source.parent.iterdir() if p.is_file()}
    files.update({f"data/{role}.npz": path.read_bytes() for role, path in spec.datasets.items()})
    options: dict[str, Any] = {"num_cpus": order.cpus, "num_gpus": order.gpus, "max_retries": 0}
    if order.memory_mb:
        options["memory"] = order.memory_mb * 2**20
    try:
        events = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        ref = ray.remote(ray_job).options(**options).remote(spec, files, events)
    except Exception as e:
        raise WorkFailed(
            "UNAVAILABLE", f"cannot hand the job to the Ray cluster at {order.address}: {type(e).__name__}: {e}; {AGAIN}"
        ) from None
    progress(ProgressEvent("ray", 0.0, f"running on the Ray cluster at {order.address}"))
    try:
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            with contextlib.suppress(Exception):
                for event in events.get_nowait_batch(events.qsize()):
                    progress(event)
            if ready:
                break
            if halt.is_set():  # the server cancelled the job: end the task now, not when the driver's exit is noticed
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
                raise WorkFailed("FAILED_PRECONDITION", f"job {spec.job_id} was cancelled; its task on the cluster was cancelled")
        result, out = ray.get(ref)
    except WorkFailed:
        raise
    except Exception as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, WorkFailed):
            raise WorkFailed(cause.kind, cause.message) from None
        text = " ".join(str(e).split())[:400]
        raise WorkFailed(
            "UNAVAILABLE", f"the job's task on the Ray cluster at {order.address} failed: {type(e).__name__}: {text}; {AGAIN}"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            events.shutdown()
    variant_dir = spec.staged / "variant"
    variant_dir.mkdir()
    for name, content in out.items():
        (variant_dir / name).write_bytes(content)
    return replace(result, variant_dir=variant_dir)


def watch(joined: RayAddress, address: str, send: Callable[[tuple], None], stop: threading.Event) -> None:
    """On a thread of its own: a cluster that stops answering fails the job in seconds. Ray's own calls block far
    longer once the cluster is gone (Ray Client waits 30 s to reconnect, a driver a minute for the GCS), so the
    failure is sent from here and the driver ends at once."""
    strikes = 0
    while not stop.wait(1.0):
        strikes = strikes + 1 if answers(joined.host, joined.port, timeout=1.0) is not None else 0
        if strikes >= LIVENESS_STRIKES and not stop.is_set():
            send(("failed", "UNAVAILABLE", f"the Ray cluster at {address} stopped answering during the job; {AGAIN}"))
            os._exit(1)  # not ray.shutdown(): it would wait for the cluster that is gone


def main(argv: list[str]) -> int:
    import pickle
    from multiprocessing.connection import Connection

    from slimserve.optimizer.base import ProgressEvent
    from slimserve.optimizer.quiet import quiet_third_party

    die_with_parent()  # the server died: so does its driver, and Ray ends the job's tasks with it
    quiet_third_party()
    conn = Connection(int(argv[0]), readable=False)
    lock = threading.Lock()

    def send(message: tuple) -> None:  # from the main thread and the watch
        with lock:
            conn.send(message)

    order: RayOrder = pickle.load(sys.stdin.buffer)
    halt = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: halt.set())
    limits = order.spec.limits if order.spec is not None else WorkLimits()
    ray = None
    stop = threading.Event()
    try:
        address = parse_ray_address(order.address)  # the server checked it: a ValueError here is a bug, reported as one
        ray, joined = connect(address, lambda message: send(("progress", ProgressEvent("ray", 0.0, message))))
        signal.signal(signal.SIGTERM, lambda *_: halt.set())  # ray.init installs its own handler: ours again
        if order.spec is None:
            send(("done", describe(ray, joined)))
            return 0
        threading.Thread(target=watch, args=(joined, order.address, send, stop), name="cluster-watch", daemon=True).start()
        result = submit(ray, joined, order, lambda event: send(("progress", event)), halt)
    except BaseException as e:
        stop.set()
        if not isinstance(e, WorkFailed | KeyboardInterrupt):
            traceback.print_exc(file=sys.stderr)
        failed = failure_of(e, limits)
        send(("failed", failed.kind, failed.message))
        return 1
    finally:
        stop.set()
        if ray is not None:
            with contextlib.suppress(Exception):
                ray.shutdown()
    send(("done", result))
    return 0


if __name__ == "__main__":
    # Through the module's own name, so that the task pickles as slimserve.server.management.ray_driver.ray_job.
    from slimserve.server.management import ray_driver

    sys.exit(ray_driver.main(sys.argv[1:]))
