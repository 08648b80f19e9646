"""The accounting domain: accounts, pricing, posting rules and the request lifecycle.

Nothing in this package knows about HTTP or the database; it turns inputs into decisions and balanced entries.
"""
