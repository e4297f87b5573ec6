"""One CPU thread for tests of tiny models: they run fastest, and steadily on a shared 2-core box, that way.

A folder's conftest imports `one_cpu_thread` to make it autouse for that folder's tests.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
