"""imgpipe: batch and streaming image classification (shared settings, record contract and CLI; no torch here)."""

__version__ = "0.1.0"
