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


@pytest.fixture(scope="module")
def tiny_model(pipe, tmp_path_factory):
    """The tiny pipeline's weights as one of our single files (configs in its metadata), 32 px: what
    the script tests train on."""
    import model
    from tests import helpers
    root = tmp_path_factory.mktemp("model")
    sd = model.load(helpers.write_diffusers_folder(pipe, str(root / "diffusers")))
    path = str(root / "tiny.safetensors")
    model.save(sd, path, resolution=32)
    return path
