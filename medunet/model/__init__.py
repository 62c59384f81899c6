"""The network and how it is stored and applied, shared by training and inference.

``networks`` builds a network from the config, ``checkpoint`` is the one on-disk format of a
trained model (typed, atomic, ``weights_only``-loadable), and ``sliding`` applies a network to a
whole volume (sliding window, flip TTA). Training and inference both import from here and never
from each other.
"""
