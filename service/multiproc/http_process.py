"""One HTTP process of ``erc serve`` with ``ERC_HTTP_PROCESSES`` > 1: the whole FastAPI service on
a socket shared with its siblings (SO_REUSEPORT), its models answered by the model process
(:mod:`service.multiproc.remote`). Started by :mod:`service.multiproc.supervisor`.

    python -m service.multiproc.http_process        # settings from ERC_* variables
"""

from __future__ import annotations

import logging
import os
import sys

from service.multiproc.supervisor import exit_with_parent, listening_socket
from service.server import serve
from service.settings import Settings


def main() -> None:
    role = os.environ.get("ERC_PROCESS_ROLE", "http")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = Settings()
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.model_process_socket is None:
        raise SystemExit("HTTP process: ERC_MODEL_PROCESS_SOCKET is not set (erc serve sets it)")
    exit_with_parent()
    serve(settings, listening_socket(settings.host, settings.port))


if __name__ == "__main__":
    main()
