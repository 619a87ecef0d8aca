"""`python -m service` is the `switchboard` command."""

from service.cli import main

raise SystemExit(main())
