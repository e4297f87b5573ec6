"""Put adapters into a live pipeline and take them out; generate images with them.

- ``Engine``: a pipeline with adapters merged in place (``activate``, ``applied``, ``restore``),
  several adapters in one batch (``per_image``, ``generate_per_image``), ``generate``.
- ``Batcher`` / ``Engine.submit(request) -> Future``: concurrent requests gathered into per-image
  batches (serving many users).
- ``generate(request)``, ``comparison_grid(request)``, ``get_engine(base)``: the verbs.
- ``read_png_parameters(path)``: the parameters an image was made with.
"""

from studio.engine.batcher import Batcher, BatcherConfig
from studio.engine.engine import Engine, EngineConfig, ImageJob
from studio.engine.live import NonFiniteUpdateError
from studio.engine.infotext import ImageParameters, parse_parameters, read_png_parameters
from studio.engine.mix import Mix, MixTerm
from studio.engine.request import GeneratedImage, GenerateRequest
from studio.engine.specs import AdapterSpecError, check_name, parse_spec
from studio.engine.verbs import comparison_grid, drop_engines, generate, get_engine

__all__ = [
    "AdapterSpecError", "Batcher", "BatcherConfig", "Engine", "EngineConfig", "GenerateRequest", "GeneratedImage",
    "ImageJob", "ImageParameters", "Mix", "MixTerm", "NonFiniteUpdateError", "check_name", "comparison_grid", "drop_engines", "generate", "get_engine", "parse_parameters",
    "parse_spec", "read_png_parameters",
]
