"""slsd: semi-supervised instance segmentation for the long tail of classes."""

__version__ = "0.1.0"
