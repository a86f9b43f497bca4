import os
import sys

import pytest
import torch

# Triton kernels run under the interpreter where there is no GPU; it must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny random diffusers StableDiffusionPipeline (one per test module: tests load LoRAs into it)."""
    from tests import helpers
    return helpers.pipeline(str(tmp_path_factory.mktemp("pipe")))
