"""Adapter Studio: import, compress, train and generate with image LoRA adapters."""

__version__ = "0.1.0"
