"""``erc serve``: uvicorn with a drain period on shutdown.

The first SIGTERM (or SIGINT) marks the process as draining: ``/readyz`` answers 503 so that a load
balancer or Kubernetes stops routing new requests here, while everything keeps being served for
``ERC_SHUTDOWN_GRACE_S`` seconds. Then uvicorn's own graceful shutdown runs: it stops listening,
finishes the requests in flight (up to 15 s) and closes the connections. Without a drain period a
request that is connected but not yet read when the signal arrives is reset by that last step. A
second signal during the drain shuts down at once.
"""

from __future__ import annotations

import logging
import socket
import threading
from types import FrameType

import uvicorn

from service.app import build_asgi
from service.http import draining
from service.settings import Settings

log = logging.getLogger("erc")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, grace: float) -> None:
        super().__init__(config)
        self.grace = grace

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.grace > 0 and not draining.is_set():
            draining.set()
            log.info("signal %d: draining for %.1f s, then shutting down", sig, self.grace)
            timer = threading.Timer(self.grace, super().handle_exit, (sig, frame))
            timer.daemon = True
            timer.start()
            return
        super().handle_exit(sig, frame)


def serve(settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve until a signal; on ``sock`` when given (an HTTP process of several), else on the
    settings' host and port."""
    config = uvicorn.Config(
        build_asgi(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=15,
        log_config=None,  # keep the root logging set up by service.cli.main()
    )
    DrainingServer(config, settings.shutdown_grace_s).run(sockets=None if sock is None else [sock])
