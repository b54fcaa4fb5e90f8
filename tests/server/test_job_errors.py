"""A failed optimizer job ends with a precise error, never INTERNAL."""

from __future__ import annotations

import errno

from slimserve.optimizer.base import OptimizerError, ProgressEvent
from slimserve.optimizer.recipes import parse_recipe
from slimserve.server.errors import ErrorKind, NotFound, SlimServeError
from slimserve.server.management.jobs import Job, JobRequest, job_error


def _job() -> Job:
    job = Job("abc123", "vad", "q", parse_recipe("quantize-static"), JobRequest("vad", "quantize-static"))
    job.events.append(ProgressEvent(stage="quantize-static", message="calibrating"))
    return job


def test_an_unforeseen_exception_names_the_job_stage_and_error_and_is_not_internal():
    error = job_error(_job(), IndexError("too many indices for array: array is 0-dimensional"))
    assert error.kind == ErrorKind.FAILED_PRECONDITION
    assert error.message.startswith("job abc123 (quantize-static on 'vad') failed at stage 'quantize-static': IndexError: too many")
    assert "nothing was registered" in error.message


def test_refusals_keep_their_kind_and_an_internal_error_becomes_a_precondition():
    assert job_error(_job(), OptimizerError("needs calibration data")).kind == ErrorKind.FAILED_PRECONDITION
    assert job_error(_job(), NotFound("model 'vad' is gone")).kind == ErrorKind.NOT_FOUND
    assert job_error(_job(), SlimServeError("boom")).kind == ErrorKind.FAILED_PRECONDITION


def test_memory_and_a_full_disk_are_resource_exhausted():
    assert job_error(_job(), MemoryError()).kind == ErrorKind.RESOURCE_EXHAUSTED
    assert job_error(_job(), OSError(errno.ENOSPC, "No space left on device")).kind == ErrorKind.RESOURCE_EXHAUSTED
