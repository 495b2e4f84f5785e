"""comeba: consecutive batch model editing with hook layers (COMEBA-HK)."""

__version__ = "0.1.0"
