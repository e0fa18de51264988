"""Apps for the launcher tests: they never import otelkit unless told to."""
