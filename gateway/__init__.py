"""Flash-sale and inventory gateway."""

__version__ = "0.1.0"
