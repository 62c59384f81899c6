"""medunet serve: a DICOM node and REST service that segments what a PACS sends and sends the results back."""
