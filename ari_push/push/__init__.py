"""Push providers behind one protocol (see docs/providers.md)."""
