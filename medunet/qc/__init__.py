"""Per-case quality control: say when a predicted mask should not be trusted (see docs/quality-control.md).

``signals`` measures (pure functions on arrays), ``reference`` summarises the training cases into the
checkpoint's fingerprint, ``decide`` turns signals into ``{"flag", "score", "reasons", "signals"}``,
``calibrate`` fits the review threshold on out-of-fold cases of known Dice.
"""
