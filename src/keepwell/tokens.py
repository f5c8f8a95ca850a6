"""Random tokens and keys, from the kernel's generator.

`os.urandom` is what the standard library's `secrets` uses underneath. `secrets` itself is not
imported: it imports `hmac`, which loads OpenSSL's libcrypto (3.5 MiB resident in every process,
beside the copy that `cryptography` carries), and a backup or a restore runs several processes.
"""

from __future__ import annotations

import os


def token_bytes(n: int) -> bytes:
    return os.urandom(n)


def token_hex(n: int) -> str:
    """``n`` random bytes as hex."""
    return os.urandom(n).hex()


def randbits(k: int) -> int:
    """A random integer of ``k`` bits."""
    size = (k + 7) // 8
    return int.from_bytes(os.urandom(size), "big") >> (size * 8 - k)
