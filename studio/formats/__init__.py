"""bytes <-> `LoraAdapter`: safe safetensors reading, every key scheme, metadata carried over."""

from studio.formats.reader import load_adapter
from studio.formats.safe import read_header, safe_load, shown_metadata
from studio.formats.tools import ToolExport, export_for
from studio.formats.writer import save_adapter

__all__ = ["ToolExport", "export_for", "load_adapter", "read_header", "safe_load", "save_adapter", "shown_metadata"]
