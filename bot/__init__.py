"""drawbridge: the platform-free core of an image-generation chat bot."""

__version__ = "0.1.0"
