"""Models that leave medunet: ``medunet export`` writes ONNX, TorchScript and MONAI Bundle packages.

``writer`` builds the package (atomically), ``networks`` writes and checks the network files,
``bundle`` the MONAI Bundle configs, ``card`` the model card. Reading a package back is
:mod:`medunet.model.package` (below inference, which loads packages). See docs/export.md.
"""
