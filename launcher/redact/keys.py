"""Private key blocks: PEM (PKCS#1, PKCS#8, SEC1, encrypted), OpenSSH and PGP.

A block runs from its BEGIN line to its END line. The cap, `KEY_BLOCK_CAP` characters, covers an
armoured RSA-4096 PGP secret key (~6.7 k) and every PEM/OpenSSH key with room to spare; a body
longer than that is redacted for the first `KEY_BLOCK_CAP` characters only. A BEGIN line with no
END line in reach is redacted together with the `KEY_BLOCK_CAP` characters after it (fail
closed: the key may still be arriving).
"""

from __future__ import annotations

from cellblock.redact.rule import Block

KEY_BLOCK_CAP = 8192

BLOCKS: tuple[Block, ...] = (
    Block(
        "private-key",
        r"-----BEGIN (?:(?:RSA|DSA|EC|ENCRYPTED) )?PRIVATE KEY-----",
        r"-----END (?:(?:RSA|DSA|EC|ENCRYPTED) )?PRIVATE KEY-----",
        KEY_BLOCK_CAP,
    ),
    Block(
        "openssh-private-key",
        r"-----BEGIN OPENSSH PRIVATE KEY-----",
        r"-----END OPENSSH PRIVATE KEY-----",
        KEY_BLOCK_CAP,
    ),
    Block(
        "pgp-private-key",
        r"-----BEGIN PGP PRIVATE KEY BLOCK-----",
        r"-----END PGP PRIVATE KEY BLOCK-----",
        KEY_BLOCK_CAP,
    ),
)
