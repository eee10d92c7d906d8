"""bloom-server: serve BLOOM-family models over HTTP."""

__version__ = "0.1.0"
