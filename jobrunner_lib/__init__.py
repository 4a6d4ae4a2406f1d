"""jr: the job runner for a secure research backend."""

__version__ = "0.1.0"
