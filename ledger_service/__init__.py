"""A double-entry ledger service for LLM API relays."""
