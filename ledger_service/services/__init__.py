"""Services: the operations of the ledger, each one transaction; no HTTP, no SQL."""
