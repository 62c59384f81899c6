"""Post-processing of predicted label maps.

``operations`` holds the pure array functions (largest component, hole filling, small-component
removal, opening, closing; sizes in mm and mm³); ``search`` chooses per class which of them the
out-of-fold predictions of a cross-validation support.
"""
