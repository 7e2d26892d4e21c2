"""Serving side of the project and the ``erc`` command line (the top of the stack)."""
