"""deft: JIT-compiled deformable convolutions for PyTorch.

    import deft
    y = deft.ops.deform_conv2d(x, offset, weight, bias, stride=1, padding=1, mask=mask)
    layer = deft.nn.DeformConv2d(64, 64, 3, padding=1)      # torchvision's constructor
    layer = deft.nn.DeformConv2dPack(64, 64, 3, padding=1)  # predicts its own offsets/mask

Forward only for now (the backward passes are not implemented). Importing needs torch but no
GPU; libdeft.so is loaded on first use ($DEFT_LIBRARY, or the source tree's build/).
"""
from ._library import library
from . import ops, nn

__all__ = ["ops", "nn", "library", "version", "gpu_available"]


def version() -> str:
    """The version of the loaded libdeft."""
    return library().version()


def gpu_available() -> bool:
    """True when libdeft finds a CUDA driver and device."""
    return library().gpu_available()
