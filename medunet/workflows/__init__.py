"""Workflows that chain the library's stages end to end: the demo, cross-validation, the PACS round trip.

They sit above training, inference and evaluation (and may use all of them); nothing in the
library imports a workflow. The CLI is a thin layer over these and over the library.
"""
