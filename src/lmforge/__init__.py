"""lmforge: a fully open language-model workbench."""

__version__ = "0.1.0"
