"""medrelay.crypto: keys, certificates, X3DH, the Double Ratchet, signed content, attachments,
safety numbers, local sealing, password hashing and transparency-log proofs.

Pure code over PyNaCl, argon2-cffi and the standard library: no I/O, no global state, randomness
and time passed in as arguments. Every failure is a `medrelay.crypto.errors.CryptoError`; no
PyNaCl or argon2 type or exception crosses this package's boundary.
"""
