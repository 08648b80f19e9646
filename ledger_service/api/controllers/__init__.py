"""Thin controllers: parse and check the input, call one service method, shape the response."""
