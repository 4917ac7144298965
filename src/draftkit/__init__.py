"""draftkit: train draft models for speculative decoding and export them to serving runtimes."""

__version__ = "0.1.0"
