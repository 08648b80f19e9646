"""`python -m ledger_service.drill`: the same as `ledger-service ha-drill`."""

from ledger_service.drill.run import main

raise SystemExit(main())
