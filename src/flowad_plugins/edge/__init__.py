"""Torch-free runtime for exported flow models: openvino, numpy and Pillow only (no torch, lightning or anomalib).

``EdgeModel("model.xml").predict(read_image(path))`` in Python, or ``flowad-predict model.xml images/ --out
results/`` on the command line.
"""

from flowad_plugins.edge.images import IMAGE_SUFFIXES, ImageReadError, find_images, read_image, resize_image
from flowad_plugins.edge.runtime import EdgeModel, Prediction
from flowad_plugins.edge.thresholds import Threshold, choose_threshold

__all__ = [
    "IMAGE_SUFFIXES",
    "EdgeModel",
    "ImageReadError",
    "Prediction",
    "Threshold",
    "choose_threshold",
    "find_images",
    "read_image",
    "resize_image",
]
