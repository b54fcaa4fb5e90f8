"""Triton's LogSettings: the server's log level and format, read and changed at run time on the root logger."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from slimserve.server.errors import InvalidArgument

FORMATS = {"default": None, "ISO8601": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
_BOOLS = ("log_info", "log_warning", "log_error")


class LogSettings:
    """Triton's settings: log_info / log_warning / log_error (bool), log_verbose_level (int), log_format; log_file
    is always "" (slimserve logs to stderr; writing elsewhere is refused)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger()
        self._format = "default"
        self._original = {id(h): h.formatter for h in self.logger.handlers}

    def get(self) -> dict[str, Any]:
        level = self.logger.getEffectiveLevel()
        return {
            "log_file": "",
            "log_info": level <= logging.INFO,
            "log_warning": level <= logging.WARNING,
            "log_error": level <= logging.ERROR,
            "log_verbose_level": 1 if level <= logging.DEBUG else 0,
            "log_format": self._format,
        }

    def update(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Checks every change first (nothing changes on an error), applies them, and returns the settings now."""
        settings = self.get()
        for key, value in changes.items():
            if key in _BOOLS:
                if not isinstance(value, bool):
                    raise InvalidArgument(f"log setting {key} must be a bool, got {value!r}")
            elif key == "log_verbose_level":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InvalidArgument(f"log setting log_verbose_level must be an integer >= 0, got {value!r}")
            elif key == "log_format":
                if value not in FORMATS:
                    raise InvalidArgument(f"log setting log_format must be one of {', '.join(FORMATS)}, got {value!r}")
            elif key == "log_file":
                if value != "":
                    raise InvalidArgument("log setting log_file is not supported: slimserve logs to stderr")
            else:
                raise InvalidArgument(f"unknown log setting {key!r}; known: log_file, {', '.join(_BOOLS)}, log_verbose_level, log_format")
            settings[key] = value
        if settings["log_verbose_level"] > 0:
            level = logging.DEBUG
        elif settings["log_info"]:
            level = logging.INFO
        elif settings["log_warning"]:
            level = logging.WARNING
        elif settings["log_error"]:
            level = logging.ERROR
        else:
            level = logging.CRITICAL
        self.logger.setLevel(level)
        if settings["log_format"] != self._format:
            self._format = settings["log_format"]
            pattern = FORMATS[self._format]
            for handler in self.logger.handlers:
                handler.setFormatter(logging.Formatter(pattern) if pattern else self._original.get(id(handler)))
        return self.get()
