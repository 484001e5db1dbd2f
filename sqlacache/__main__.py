"""``python -m sqlacache``: the operators' command line (see ``sqlacache.cli``)."""

from sqlacache.cli.main import main

raise SystemExit(main())
