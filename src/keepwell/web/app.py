"""Build the web server for a config: `web_server` (with the jobs a daemon or this process runs)
and `daemon_service` (the factory the daemon takes, so it serves the app beside its jobs)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from keepwell.control.config import LoadedConfig
from keepwell.control.history import open_history
from keepwell.control.logs import log_event
from keepwell.control.runner import LiveJobs
from keepwell.control.secrets import resolve
from keepwell.web.server import WebServer
from keepwell.web.views import Dashboard


class WebService:
    """A `WebServer` with its own connection to the job history (`keepwell.control.daemon`'s
    `Service`)."""

    def __init__(self, loaded: LoadedConfig, live: LiveJobs, listen: str,
                 log: logging.Logger) -> None:
        cfg = loaded.config
        token = resolve(cfg.web.token, what="web token") if cfg.web.token else None
        viewer = resolve(cfg.web.viewer_token, what="web viewer token") \
            if cfg.web.viewer_token else None
        tls = (cfg.web.tls_cert, cfg.web.tls_key) if cfg.web.tls_cert and cfg.web.tls_key \
            else None
        self.history = open_history(cfg)
        try:
            self.dashboard = Dashboard(loaded, self.history, live)
            self.server = WebServer(self.dashboard, listen, token, tls, viewer)
        except BaseException:
            self.history.close()
            raise
        self.log = log

    def start(self) -> None:
        self.server.start()
        log_event(self.log, "web_listening", address=self.server.address)

    def stop(self) -> None:
        self.server.stop()
        self.history.close()


def daemon_service(loaded: LoadedConfig, log: logging.Logger
                   ) -> Callable[[LiveJobs], WebService] | None:
    """The factory of the web service the daemon runs, or None when ``web.listen`` is unset."""
    listen = loaded.config.web.listen
    if listen is None:
        return None
    return lambda live: WebService(loaded, live, listen, log)
