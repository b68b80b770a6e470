"""Telemetry behind one facade; the only module that imports `datadog`.

For now: events (scale actions, pools without capacity), sent to the DogStatsD agent when
Datadog's own variables name one (`DD_AGENT_HOST` / `DD_DOGSTATSD_PORT`, or
`DD_DOGSTATSD_URL` incl. `unix://`), and always written to the log. Sending is
fire-and-forget UDP/UDS in the client library: it never blocks on an absent agent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("sidecar.events")


def _dogstatsd(env: Mapping[str, str]) -> Any | None:
    url = env.get("DD_DOGSTATSD_URL", "")
    host = env.get("DD_AGENT_HOST", "")
    if not url and not host:
        return None
    from datadog.dogstatsd import DogStatsd

    tags = [t for t in env.get("DD_TAGS", "").replace(",", " ").split() if t]
    for key, name in (("DD_ENV", "env"), ("DD_SERVICE", "service"), ("DD_VERSION", "version")):
        if env.get(key):
            tags.append(f"{name}:{env[key]}")
    if url.startswith("unix://"):
        return DogStatsd(socket_path=url[len("unix://"):], constant_tags=tags,
                         disable_telemetry=True)
    if url.startswith("udp://"):
        host, _, port = url[len("udp://"):].partition(":")
        return DogStatsd(host=host, port=int(port or 8125), constant_tags=tags,
                         disable_telemetry=True)
    return DogStatsd(host=host, port=int(env.get("DD_DOGSTATSD_PORT") or 8125),
                     constant_tags=tags, disable_telemetry=True)


class Events:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._client = _dogstatsd(os.environ if env is None else env)
        self.sent: list[dict[str, Any]] = []  # the last few, for status views and tests

    def event(self, title: str, text: str, *, alert_type: str = "info",
              tags: Sequence[str] = ()) -> None:
        log.info("event: %s: %s %s", title, text, " ".join(tags))
        self.sent = [*self.sent[-49:], {"title": title, "text": text,
                                        "alert_type": alert_type, "tags": list(tags)}]
        if self._client is not None:
            self._client.event(title, text, alert_type=alert_type, tags=list(tags))

    def close(self) -> None:
        if self._client is not None:
            self._client.close_socket()
