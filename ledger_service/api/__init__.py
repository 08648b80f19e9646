"""The HTTP layer: the app factory, authentication, problem responses and thin controllers."""
