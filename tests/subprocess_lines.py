"""Waiting for a line of a running subprocess's stdout without losing what follows it."""

import os


def read_until(proc, prefix: str) -> str:
    """Reads proc's stdout a byte at a time up to and including the first line starting with prefix (or to the
    end); returns what it read. Iterating the text stream instead would read ahead into its buffer, which
    `communicate(timeout=...)` never sees (it reads the raw pipe): a line that came with the awaited one would be
    lost."""
    fd, lines, line = proc.stdout.fileno(), [], b""
    while True:
        byte = os.read(fd, 1)
        if not byte:
            return "".join(lines) + line.decode()
        line += byte
        if byte == b"\n":
            lines.append(line.decode())
            line = b""
            if lines[-1].startswith(prefix):
                return "".join(lines)
