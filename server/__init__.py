"""ropeserve server: HTTP layer, engines and metrics."""

__version__ = "0.1.0"
