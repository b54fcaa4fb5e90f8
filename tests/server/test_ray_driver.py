"""The Ray driver's plain parts, without Ray: the addresses it takes and how it finds this host's part of a cluster
(the jobs on a real loopback Ray head are tests/server/test_jobs_ray.py's)."""

from __future__ import annotations

import socket

import pytest

from slimserve.server.management.ray_driver import RayAddress, local_gcs_of_client, local_raylet_of, parse_ray_address

RAYLET = [
    "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet",
    "--raylet_socket_name=/tmp/ray/session_x/sockets/raylet",
    "--node_ip_address=127.0.0.1",
    "--gcs-address=127.0.0.1:46379",
]
PROXIER = [
    "/venv/bin/python",
    "-m",
    "ray.util.client.server",
    "--address=127.0.0.1:46379",
    "--host=127.0.0.1",
    "--port=41001",
    "--mode=proxy",
]


def test_both_ray_addresses_parse_and_anything_else_is_refused_naming_both_forms():
    assert parse_ray_address("ray://10.0.0.1:10001") == RayAddress("ray", "10.0.0.1", 10001)
    assert parse_ray_address("ray+gcs://head:6379").mode == "gcs"
    assert str(parse_ray_address("ray+gcs://head:6379")) == "ray+gcs://head:6379"
    for bad in ("ray://nohostport", "http://head:8265", "ray://head:notaport", "ray+gcs://head:6379/x", "head:6379"):
        with pytest.raises(ValueError) as e:
            parse_ray_address(bad)
        assert "ray://HOST:PORT" in str(e.value) and "ray+gcs://HOST:PORT" in str(e.value) and repr(bad) in str(e.value)


def test_a_gcs_driver_needs_a_raylet_of_that_cluster_on_this_host():
    assert local_raylet_of(RayAddress("ray+gcs", "127.0.0.1", 46379), [RAYLET, PROXIER])
    assert local_raylet_of(RayAddress("ray+gcs", "localhost", 46379), [RAYLET])  # the same host by another name
    node_ip = [a.replace("127.0.0.1", socket.gethostbyname(socket.gethostname())) for a in RAYLET]  # as Ray writes it
    assert local_raylet_of(RayAddress("ray+gcs", "127.0.0.1", 46379), [node_ip])
    assert not local_raylet_of(RayAddress("ray+gcs", "192.0.2.250", 46379), [node_ip])  # another machine's head
    assert not local_raylet_of(RayAddress("ray+gcs", "127.0.0.1", 6379), [RAYLET])  # another cluster's raylet
    assert not local_raylet_of(RayAddress("ray+gcs", "127.0.0.1", 46379), [PROXIER, ["python", "--gcs-address=127.0.0.1:46379"]])


def test_the_gcs_behind_a_local_client_server_is_found_from_its_command_line():
    assert local_gcs_of_client(RayAddress("ray", "127.0.0.1", 41001), [RAYLET, PROXIER]) == "127.0.0.1:46379"
    assert local_gcs_of_client(RayAddress("ray", "127.0.0.1", 10001), [PROXIER]) is None  # another port
    specific = [a.replace("--mode=proxy", "--mode=specific-server") for a in PROXIER]
    assert local_gcs_of_client(RayAddress("ray", "127.0.0.1", 41001), [specific]) is None


def test_the_driver_sends_a_token_where_one_is_available_and_the_mode_is_unset(tmp_path, monkeypatch):
    """Ray 2.59+ turns token authentication on for `ray start --head` when a token exists; a driver with RAY_AUTH_MODE
    unset would connect without it and be refused (Ray Client says only 'connection timeout')."""
    from slimserve.server.management.ray_driver import use_token_if_available

    monkeypatch.setenv("HOME", str(tmp_path))
    assert not use_token_if_available(env := {}) and "RAY_AUTH_MODE" not in env  # no token anywhere: as Ray's default
    assert use_token_if_available(env := {"RAY_AUTH_TOKEN": "secret"}) and env["RAY_AUTH_MODE"] == "token"
    (tmp_path / "token").write_text("secret")
    assert use_token_if_available(env := {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}) and env["RAY_AUTH_MODE"] == "token"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret")  # what `ray start --head` writes
    assert use_token_if_available(env := {}) and env["RAY_AUTH_MODE"] == "token"
    assert not use_token_if_available(env := {"RAY_AUTH_MODE": "disabled"}) and env["RAY_AUTH_MODE"] == "disabled"  # explicit: kept
