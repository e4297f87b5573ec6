"""EigenLoRAx subspaces: canonical form, per-layer principal components, projection, the one
streaming compress (`compress_events`, with its collection report), similarity in weight space,
and the compressed collection file. Math takes tensors; the caller picks the device.

Where things live: `stream` (compress), `statistics` / `store` / `evaluate` (its passes),
`report` (baselines, verdict, duplicates), `similar`, `reconstruct` (`studio project`),
`collection` (the file: layout, writing, reading), `training` (a trainable EigenLoRA adapter on a
collection file), `oracle` (the in-memory Gram compress, a test oracle no front end calls).
"""

from studio.subspace.canonical import canonical
from studio.subspace.collection import CompressedCollection, export_from_collection, is_collection_file
from studio.subspace.extract import LayerSubspace, SubspaceSpec, SubspaceWarning, extract, reference_extract
from studio.subspace.project import ErrorParts, error_parts, project
from studio.subspace.reconstruct import ProjectResult, project_adapter
from studio.subspace.report import CollectionReport, SimilarPair
from studio.subspace.similar import SimilarResult, similar
from studio.subspace.sources import FileSource, HeldSource, file_sources, held_sources
from studio.subspace.stream import AdapterReport, CompressResult, compress_events, compress_files, compress_sources

__all__ = [
    "AdapterReport", "CollectionReport", "CompressResult", "CompressedCollection", "ErrorParts", "FileSource", "HeldSource",
    "LayerSubspace", "ProjectResult", "SimilarPair", "SimilarResult", "SubspaceSpec", "SubspaceWarning", "canonical",
    "compress_events", "compress_files", "compress_sources", "error_parts", "export_from_collection", "extract", "file_sources",
    "held_sources", "is_collection_file", "project", "project_adapter", "reference_extract", "similar",
]
