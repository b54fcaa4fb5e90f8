"""`slimctl optimize --detach`, `slimctl jobs [--json]`, `slimctl jobs cancel ID`, and Ctrl-C on `slimctl optimize`."""

import json

import pytest
import typer
from typer.testing import CliRunner

from slimserve.client import cli_jobs
from slimserve.client.cli import app
from tests.helpers import wait_until

runner = CliRunner()


def slimctl(server, *args):
    return runner.invoke(app, ["--server", server.address, *map(str, args)])


def test_detach_list_and_cancel(server, digits):
    assert slimctl(server, "register", "digits", digits.onnx, "--data", digits.data, "--train", digits.train).exit_code == 0
    # The baseline's background measurement done first: no test ends while the server's thread still imports modules.
    wait_until(lambda: server.server.repository.get("digits").variants["baseline"].evaluation, "the baseline's measurement", 120, 0.2)
    result = slimctl(server, "optimize", "digits", "--recipe", "prune-structured", "--detach", "--json")
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.output)["job_id"]

    def listed():
        r = slimctl(server, "jobs", "--json")
        assert r.exit_code == 0, r.output
        return next(j for j in json.loads(r.output) if j["id"] == job_id)

    job = wait_until(lambda: (j := listed())["status"] == "running" and j, "the job to run", 60, 0.2)
    assert job["model"] == "digits" and job["recipe"] == "prune-structured" and job["started_at"]
    table = slimctl(server, "jobs")
    assert job_id in table.output and "running" in table.output

    result = slimctl(server, "jobs", "cancel", job_id)
    assert result.exit_code == 0 and f"job {job_id} (digits: prune-structured) cancelled" in result.output, result.output
    assert listed()["status"] == "cancelled"
    again = slimctl(server, "jobs", "cancel", job_id)
    assert again.exit_code == 1 and "has already ended: cancelled" in again.output
    unknown = slimctl(server, "jobs", "cancel", "nosuchjob")
    assert unknown.exit_code == 1 and "no job 'nosuchjob'" in unknown.output


def test_ctrl_c_cancels_with_cancel_on_interrupt(monkeypatch):
    cancelled = []

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def cancel_job(self, job_id):
            cancelled.append(job_id)
            return {"id": job_id, "status": "cancelled"}

    monkeypatch.setattr(cli_jobs, "connect", Client)
    with pytest.raises(typer.Exit) as e:
        cli_jobs.interrupted("abc123", cancel_without_asking=True)
    assert e.value.exit_code == 130 and cancelled == ["abc123"]
    # Without a terminal to ask on and without the flag, the job goes on.
    monkeypatch.setattr(cli_jobs.sys.stdin, "isatty", lambda: False, raising=False)
    with pytest.raises(typer.Exit):
        cli_jobs.interrupted("def456", cancel_without_asking=False)
    assert cancelled == ["abc123"]
