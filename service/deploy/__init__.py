"""The deployment's run-time config files, shipped in the wheel as package data.

One copy of each, read by ``erc stack`` (:mod:`service.stack`), by :mod:`service.torchserve` and
by the container images (``docker/*/Dockerfile`` copy them from here):

- ``nginx.conf``: the proxy in front of the API replicas (a template: ``@SERVERS@``, ``@LISTEN@``,
  ``@RUNDIR@``);
- ``prometheus.yml``: the scrape config (compose finds replicas and workers by DNS; ``erc stack``
  replaces that discovery with loopback targets);
- ``torchserve.properties``: TorchServe's config (``erc stack``, the tests and the image fill in
  addresses, model store and model table).

They are found through :mod:`importlib.resources`, never relative to a checkout.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

__all__ = ["NGINX_CONFIG", "PROMETHEUS_CONFIG", "TORCHSERVE_CONFIG", "Traversable"]

NGINX_CONFIG: Traversable = files(__name__) / "nginx.conf"
PROMETHEUS_CONFIG: Traversable = files(__name__) / "prometheus.yml"
TORCHSERVE_CONFIG: Traversable = files(__name__) / "torchserve.properties"
