"""Experiment drivers: scripts that use the library and the ``erc`` command line to produce the
figures in docs/ (they are not part of the installed package; run them from a checkout)."""
