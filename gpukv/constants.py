"""Bounds shared by every layer (kept import-light: the protocol and the client import them)."""

MAX_READERS = 128  # shares one owner may hold on one object; the largest tp_size / num_readers
HASH_BYTES = 16  # bytes of one chained chunk hash
