"""The version of nvformer (one place: the package, the adapter files and the CLI read it)."""

__version__ = "0.2.0"
