"""``python -m awqfx ...``: the same CLI as the ``awqfx`` command."""
from awqfx.app.cli import main

raise SystemExit(main())
