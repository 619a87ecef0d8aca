"""`python -m service` is the `switchboard` command."""

from service.cli.main import main

raise SystemExit(main())
