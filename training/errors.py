"""The training library's one error base. Everything it raises on purpose about the user's inputs
(a config key, a data file, a model card, a model that is not there, an attack that does not fit)
derives from :class:`ErcError`, so a front end (``erc``) catches one type and prints one line.

::

    ErcError
    ├── ConfigError        a config key or value that cannot be applied   (training.config)
    ├── DataError          a data file missing, corrupt or inconsistent    (training.data)
    ├── CardError          a stored model that must not be loaded          (training.card)
    ├── ModelNotFound      no store model or run directory by that name     (training.card)
    ├── DeviceUnavailable  a device this machine does not have              (training.devices)
    ├── AttackError        an attack that does not exist or does not fit    (training.attacks)
    └── UnknownName        no dataset, architecture, method or prior by that name (also a KeyError)

Service errors (HTTP) have their own tree in :mod:`service.errors`.
"""

from __future__ import annotations


class ErcError(Exception):
    """Base of the errors the library raises about its inputs; the message is for the user."""


class UnknownName(ErcError, KeyError):
    """A registry lookup of a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


__all__ = ["ErcError", "UnknownName"]
