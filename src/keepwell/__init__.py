"""keepwell: deduplicated, compressed, encrypted, verifiable backups of files and databases."""

__version__ = "0.1.0"
