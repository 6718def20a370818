"""deft: JIT-compiled deformable convolutions for PyTorch.

    import deft
    y = deft.ops.deform_conv2d(x, offset, weight, bias, stride=1, padding=1, mask=mask)
    layer = deft.nn.DeformConv2d(64, 64, 3, padding=1)      # torchvision's constructor
    layer = deft.nn.DeformConv2dPack(64, 64, 3, padding=1)  # predicts its own offsets/mask
    deft.export_layers(model, example_inputs, "model.json") # for `deft tune model.json`
    deft.load_tuning("tuned.db")                            # compile against tuned records

Forward and backward (autograd for input, offset, weight, bias and mask; torch.compile;
autocast; deterministic gradients under torch.use_deterministic_algorithms(True)). Importing
needs torch but no GPU; libdeft.so is loaded on first use ($DEFT_LIBRARY, or the source tree's
build/), and the ops run on CUDA tensors only.
"""
from ._library import library
from . import ops, nn
from .tuning import export_layers, load_tuning, tuning_path

__all__ = ["ops", "nn", "library", "version", "gpu_available", "export_layers", "load_tuning",
           "tuning_path", "release_workspace"]


def version() -> str:
    """The version of the loaded libdeft."""
    return library().version()


def gpu_available() -> bool:
    """True when libdeft finds a CUDA driver and device."""
    return library().gpu_available()


def release_workspace() -> None:
    """Return the memory deft keeps for its kernels' per-call workspaces to the driver (as
    torch.cuda.empty_cache() does for PyTorch's allocator). deft keeps freed workspaces in a
    per-device pool so that the next call (the next training step) need not map them again;
    the pool holds at most the largest workspaces in flight at once."""
    library().release_workspace()
