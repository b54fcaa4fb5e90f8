"""Triton's LogSettings on the server's loggers (server/telemetry/log_settings.py)."""

from __future__ import annotations

import logging

import pytest

from slimserve.server.errors import InvalidArgument
from slimserve.server.telemetry.log_settings import LogSettings


def test_levels_and_format_change_and_read_back():
    logger = logging.getLogger("slimserve-test-logs")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logs = LogSettings(logger)
    try:
        assert logs.get() == {
            "log_file": "",
            "log_info": True,
            "log_warning": True,
            "log_error": True,
            "log_verbose_level": 0,
            "log_format": "default",
        }
        assert logs.update({"log_verbose_level": 2, "log_format": "ISO8601"})["log_verbose_level"] == 1
        assert logger.level == logging.DEBUG and "%(asctime)s" in handler.formatter._fmt
        settings = logs.update({"log_verbose_level": 0, "log_info": False, "log_format": "default"})
        assert logger.level == logging.WARNING and not settings["log_info"] and settings["log_warning"]
        assert handler.formatter is None
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"log_info": 1}, "must be a bool"),
        ({"log_file": "/tmp/x"}, "not supported"),
        ({"log_format": "json"}, "must be one of"),
        ({"log_verbose_level": -1}, ">= 0"),
        ({"colour": True}, "unknown log setting"),
    ],
)
def test_bad_settings_change_nothing(changes, message):
    logger = logging.getLogger("slimserve-test-logs-bad")
    logger.setLevel(logging.INFO)
    logs = LogSettings(logger)
    with pytest.raises(InvalidArgument, match=message):
        logs.update({"log_verbose_level": 1, **changes})
    assert logger.level == logging.INFO
