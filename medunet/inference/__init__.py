"""Inference: sliding-window prediction and the Segmenter that puts masks on the input grid."""
