"""The feature grid's geometry, shared by the backbone, the losses and the lesion synthesis.

A light module (no torch, no timm), so that data code can use it without importing the networks.
"""

FEATURE_DIM = 384  # channels: 128 (ResNet18 layer2) + 256 (layer3)
FEATURE_STRIDE = 8  # one feature cell per 8 x 8 pixels: the grid is layer2's, H/8 x W/8
