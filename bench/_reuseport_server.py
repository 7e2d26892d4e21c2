"""One process of the "several processes on one port" layout that bench/serve.py measures beside
``erc serve`` (issue 18's first proposal): the service's ASGI app under uvicorn on a socket bound
with SO_REUSEPORT, so that the kernel spreads connections over N such processes, each with its own
model, batcher and ``ERC_TORCH_THREADS``. A measurement device, not a way to run the service: its
metrics are per process and nothing supervises it.

    python bench/_reuseport_server.py PORT      # ERC_* settings from the environment
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn

from service.app import build_asgi
from service.settings import Settings


def main() -> None:
    port = int(sys.argv[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    logging.basicConfig(level=logging.INFO)  # bench/serve.py waits for uvicorn's startup line
    config = uvicorn.Config(
        build_asgi(Settings()), loop="uvloop", http="httptools", access_log=False, log_config=None
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
