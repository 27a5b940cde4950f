"""Reading a server-sent event stream in Python (the benchmark and the tests follow jobs with it;
any client of ``GET /v1/jobs/{id}/events`` may). Browsers have ``EventSource`` built in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator


@dataclass
class SseMessage:
    """One dispatched event (``event``/``id``/``data`` fields) or one comment line (``comment``)."""

    event: str = "message"
    id: str = ""
    data: str = ""
    comment: str = ""

    @property
    def is_comment(self) -> bool:
        return bool(self.comment) and not self.data

    def json(self) -> Any:
        return json.loads(self.data)


def iter_sse(lines: Iterable[str]) -> Iterator[SseMessage]:
    """Messages of a ``text/event-stream`` given its lines (without line ends), per the HTML
    standard's parsing rules: a blank line dispatches, ``:`` starts a comment, ``data`` lines join
    with newlines."""
    event, data = SseMessage(), []
    for line in lines:
        if not line:
            if data:
                event.data = "\n".join(data)
                yield event
            event, data = SseMessage(), []
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if not name:
            yield SseMessage(event="", comment=value or " ")
        elif name == "data":
            data.append(value)
        elif name == "event":
            event.event = value
        elif name == "id":
            event.id = value
