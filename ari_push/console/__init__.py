"""The operator's console on the daemon's HTTP server (docs/operations.md, "Console")."""
