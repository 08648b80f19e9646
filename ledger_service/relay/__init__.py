"""Reading a relay's own database (one-api, new-api), read-only: the source of `import-relay` and `compare-relay`."""
