"""The version of swinv2, written into the files it saves."""

__version__ = "0.1.0"
