"""The one declaration of the server settings: the flags of `slimserve start` and SLIMSERVE_* follow it (the docs' settings
page is rendered from it too: tests/test_docs.py)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from slimserve.server.cli import app
from slimserve.server.settings import Settings


def start_options() -> dict:
    command = typer.main.get_command(app).commands["start"]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params if p.param_type_name == "option"}


def test_every_setting_is_a_flag_of_start_with_its_description_as_help():
    options = start_options()
    assert set(options) == {*Settings.model_fields, "log_level"}
    for name, field in Settings.model_fields.items():
        assert options[name].help == (field.description or "").replace("`", ""), name
    # The flags the README, the manifests and people's scripts use keep working.
    assert options["batching"].opts == ["--batching"] and options["batching"].secondary_opts == ["--no-batching"]
    for switch in ("protect_inference", "read_only"):
        assert options[switch].opts == ["--" + switch.replace("_", "-")] and options[switch].secondary_opts == []
    assert options["grpc_port"].opts == ["--grpc-port"] and options["poll_repository_s"].opts == ["--poll-repository-s"]


@pytest.fixture
def started(monkeypatch):
    """`slimserve start` with SlimServer replaced by one that records the settings it was given and returns at once."""
    seen: list[Settings] = []

    class Recorder:
        def __init__(self, settings: Settings) -> None:
            seen.append(settings)

        async def serve_until_signal(self) -> None:
            return None

    monkeypatch.setattr("slimserve.server.app.SlimServer", Recorder)
    for name in Settings.model_fields:
        monkeypatch.delenv(f"SLIMSERVE_{name.upper()}", raising=False)

    def start(*flags: str) -> Settings:
        result = CliRunner().invoke(app, ["start", *flags])
        assert result.exit_code == 0, result.output
        return seen[-1]

    return start


def test_a_flag_beats_the_environment_which_beats_the_default(started, monkeypatch):
    assert started().grpc_port == 8001 and started().batching is True
    monkeypatch.setenv("SLIMSERVE_GRPC_PORT", "9001")
    monkeypatch.setenv("SLIMSERVE_BATCHING", "false")
    monkeypatch.setenv("SLIMSERVE_PREFERRED_BATCH_SIZES", "[4, 8]")
    settings = started()
    assert settings.grpc_port == 9001 and settings.batching is False and settings.preferred_batch_sizes == [4, 8]
    settings = started("--grpc-port", "9002", "--batching", "--preferred-batch-sizes", "16")
    assert settings.grpc_port == 9002 and settings.batching is True and settings.preferred_batch_sizes == [16]


def test_flags_of_every_kind_reach_the_settings(started, tmp_path):
    settings = started(
        "--repository",
        str(tmp_path),
        "--no-batching",
        "--read-only",
        "--protect-inference",
        "--max-queue-delay-ms",
        "2.5",
        "--tls-ca",
        str(tmp_path / "ca.pem"),
        "--shutdown-grace-s",
        "5",
    )
    assert settings.repository == tmp_path and settings.tls_ca == tmp_path / "ca.pem"
    assert (settings.batching, settings.read_only, settings.protect_inference) == (False, True, True)
    assert settings.max_queue_delay_ms == 2.5 and settings.shutdown_grace_s == 5.0
    assert started().tls_ca is None and started().preferred_batch_sizes == []


def test_start_refuses_a_value_the_setting_does_not_allow(started):
    result = CliRunner().invoke(app, ["start", "--max-concurrent-calls", "0"])
    assert result.exit_code == 2 and result.output.startswith("slimserve: ") and "max_concurrent_calls" in result.output
