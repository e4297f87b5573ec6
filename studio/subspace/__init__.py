"""EigenLoRAx subspaces: canonical form, per-layer principal components, projection, streaming
statistics across ranks, and the compressed collection file. Math takes tensors; the caller
picks the device."""

from studio.subspace.canonical import canonical
from studio.subspace.collection import CompressedCollection
from studio.subspace.extract import LayerSubspace, SubspaceSpec, SubspaceWarning, extract, reference_extract
from studio.subspace.project import ErrorParts, error_parts, project
from studio.subspace.verbs import (
    CompressResult,
    ProjectResult,
    compress,
    compress_files,
    compress_sources,
    export_from_collection,
    leave_one_out,
    project_adapter,
    reconstruction_errors,
)

__all__ = [
    "CompressResult", "CompressedCollection", "ErrorParts", "LayerSubspace", "ProjectResult", "SubspaceSpec",
    "SubspaceWarning", "canonical", "compress", "compress_files", "compress_sources", "error_parts", "export_from_collection",
    "extract", "leave_one_out", "project", "project_adapter", "reconstruction_errors", "reference_extract",
]
