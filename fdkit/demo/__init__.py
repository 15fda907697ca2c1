"""The embedded demo: a small ERNIE 4.5 that adds and subtracts, thinking in visible steps."""
