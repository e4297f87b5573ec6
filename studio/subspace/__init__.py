"""EigenLoRAx subspaces: canonical form, per-layer principal components, projection, streaming
statistics across ranks, and the compressed collection file. Math takes tensors; the caller
picks the device."""

from studio.subspace.canonical import canonical
from studio.subspace.collection import CompressedCollection, export_from_collection
from studio.subspace.extract import LayerSubspace, SubspaceSpec, SubspaceWarning, extract, reference_extract
from studio.subspace.project import ErrorParts, error_parts, project
from studio.subspace.verbs import (
    CompressResult,
    ProjectResult,
    compress,
    compress_events,
    compress_files,
    compress_sources,
    file_sources,
    leave_one_out,
    project_adapter,
    reconstruction_errors,
)

__all__ = [
    "CompressResult", "CompressedCollection", "ErrorParts", "LayerSubspace", "ProjectResult", "SubspaceSpec",
    "SubspaceWarning", "canonical", "compress", "compress_events", "compress_files", "compress_sources", "error_parts", "export_from_collection", "file_sources",
    "extract", "leave_one_out", "project", "project_adapter", "reconstruction_errors", "reference_extract",
]
