"""`python -m rulebound`: the same as the `rulebound` command."""

from rulebound.adapters.cli import main

raise SystemExit(main())
