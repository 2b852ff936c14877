"""ari-push: mobile push notifications for Asterisk."""

__version__ = "0.1.0"
