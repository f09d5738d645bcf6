"""nuclick-bridge: one click per nucleus in, one exact polygon per click out."""

__version__ = "0.1.0"
