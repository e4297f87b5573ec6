"""The collection library: one entry per file, read again when the file is rewritten."""

from __future__ import annotations

import os
import shutil

import torch

from studio.app.library import Library


def test_a_rewritten_file_is_read_again(tiny_pipeline_dir, tiny_zoo, tmp_path):
    """A resumed run rewrites its LoRA under the same name: the collection must hold the new one."""
    target = tmp_path / "run.safetensors"
    shutil.copy(tiny_zoo / "style0.safetensors", target)
    library = Library()
    first = library.add_file(target, str(tiny_pipeline_dir)).adapter
    assert library.add_file(target, str(tiny_pipeline_dir)).adapter is first  # unchanged: not read twice
    shutil.copy(tiny_zoo / "style1.safetensors", target)
    os.utime(target, ns=(1, 1))  # a new stamp even on a coarse-clock filesystem
    second = library.add_file(target, str(tiny_pipeline_dir)).adapter
    layer = next(iter(first.lora_layers))
    assert second is not first and not torch.equal(first.lora_layers[layer].up, second.lora_layers[layer].up)
    assert len(library.entries()) == 1 and library.entries()[0].ok
