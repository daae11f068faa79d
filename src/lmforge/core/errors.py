"""The one exception type users see: a clear message, no traceback."""


class LmforgeError(Exception):
    """A problem with the user's input or environment, reported as one line with exit code 2."""


class OutputWriteError(LmforgeError):
    """The filesystem refused an output (disk full, quota, read-only, no permission): which file, why, and how
    much space is left there. The previous output under that name is untouched (writes are atomic)."""

    def __init__(self, path: str, reason: str, free_bytes: int | None):
        super().__init__(path, reason, free_bytes)  # all three in args, so it crosses process boundaries intact
        self.path, self.reason, self.free_bytes = path, reason, free_bytes

    def __str__(self) -> str:
        free = "unknown" if self.free_bytes is None else f"{self.free_bytes:,} bytes"
        return f"cannot write {self.path}: {self.reason} (free space on that filesystem: {free})"


class OutputLockedError(LmforgeError):
    """Another live process holds the output directory."""
