"""mocd_train: multi-objective alignment — policies, value functions, MAP palettes, decoding teachers, students."""

__version__ = "0.1.0"
