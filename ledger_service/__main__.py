from ledger_service.cli import main

raise SystemExit(main())
