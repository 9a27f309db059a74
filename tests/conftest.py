import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA, the Triton kernels run under Triton's CPU interpreter (tests/test_paged_attention).
# It must be chosen before anything imports triton: its own library functions are compiled or
# interpreted at that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
# Keep the suite's own threads modest on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory):
    from checkpoints import write_tiny_llada
    path = tmp_path_factory.mktemp("llada")
    reference = write_tiny_llada(path)
    return path, reference


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory):
    from checkpoints import write_tiny_dream
    path = tmp_path_factory.mktemp("dream")
    reference = write_tiny_dream(path)
    return path, reference
