"""Know the data before training: dataset fingerprint, memory model and the planner behind ``medunet plan``."""
