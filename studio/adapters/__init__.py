"""Adapter families. Each module holds one family: its config, parameters and `delta(layer)`."""

from studio.adapters.base import Adapter, LowRankAdapter, weight_shape_delta
from studio.adapters.lora import LoraAdapter, LoraLayer

__all__ = ["Adapter", "LowRankAdapter", "LoraAdapter", "LoraLayer", "weight_shape_delta"]
