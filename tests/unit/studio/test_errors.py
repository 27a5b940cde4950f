"""Refusals reach the page as the gateway's message under a title naming the status."""

from __future__ import annotations

from studio.app import _as_gr_error
from studio.forms import InvalidInput
from studio.jobs import StudioError


def test_the_sdks_error_text_keeps_the_whole_message() -> None:
    error = StudioError.from_result_error("RESOURCE_EXHAUSTED: queue is full: 64 requests waiting, limit 64")
    assert (error.code, error.message) == ("RESOURCE_EXHAUSTED", "queue is full: 64 requests waiting, limit 64")
    assert StudioError.from_result_error(None).code == "UNKNOWN"


def test_each_status_reads_as_what_the_user_can_do() -> None:
    busy = _as_gr_error(StudioError("RESOURCE_EXHAUSTED", "queue is full"))
    assert (busy.title, busy.message) == ("The server is busy", "queue is full")
    invalid = _as_gr_error(StudioError("INVALID_ARGUMENT", "duration must be in [10, 600] seconds, got 700"))
    assert (invalid.title, invalid.message) == ("Invalid input", "duration must be in [10, 600] seconds, got 700")
    refused_here = _as_gr_error(InvalidInput("retake_seeds", "retake_seeds must be integers"))
    assert (refused_here.title, refused_here.message) == ("Invalid input", "retake_seeds must be integers")
    assert _as_gr_error(StudioError("DATA_LOSS", "x")).title == "Error"
