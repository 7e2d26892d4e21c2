"""One HTTP process of ``erc serve`` with ``ERC_HTTP_PROCESSES`` > 1: the whole FastAPI service on
a socket shared with its siblings (SO_REUSEPORT), its models answered by the model process
(:mod:`service.multiproc.remote`). Started by :mod:`service.multiproc.supervisor`.

    python -m service.multiproc.http_process        # settings from ERC_* variables
"""

from __future__ import annotations

from service.multiproc.supervisor import child_settings, listening_socket
from service.server import serve


def main() -> None:
    settings = child_settings("HTTP process")
    serve(settings, listening_socket(settings.host, settings.port))


if __name__ == "__main__":
    main()
