"""Serving side of the project and the ``erc`` command line (the top of the stack)."""

from training import __version__

__all__ = ["__version__"]
