"""st-bridge: runs local GGUF models for SillyTavern."""

__version__ = "0.1.0"
