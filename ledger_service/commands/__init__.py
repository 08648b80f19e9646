"""The long-running operator commands behind `ledger-service` (cli.py): their runs, progress and printed reports."""
