"""The package version, in a module of its own so that submodules can read it without
importing the package root (which imports most of the library)."""

__version__ = "0.1.0"
