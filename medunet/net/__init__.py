"""Network I/O: talking to other systems over the network, below the workflows that decide what to exchange.

``dicomweb.py`` is a DICOMweb client (QIDO-RS, WADO-RS, STOW-RS). Services that receive, such as a DICOM
listener or a STOW-RS receiver, belong here beside it; what is done with what they receive is a workflow's.
"""
