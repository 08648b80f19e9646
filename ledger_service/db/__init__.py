"""The only package that speaks SQL: engine and transactions, tables, and one query module per concern."""
