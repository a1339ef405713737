"""Errors every layer shares (kept import-light: the protocol and the client raise them too)."""


class Busy(ValueError):
    """A bound was reached (open requests, in-flight work, reserved bytes): retry later, or end
    requests first. Nothing was changed by the refused call."""
