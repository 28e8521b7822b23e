"""The package version, in a room of its own so that the checkpoint writers can record it without importing
the package from inside it."""

__version__ = "0.1.0"
