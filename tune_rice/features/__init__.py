"""Frozen backbones (torchvision and timm) and the feature banks they fill."""
