"""``python -m service.cli`` is ``erc``."""

from service.cli import main

raise SystemExit(main())
