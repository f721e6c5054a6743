"""The repository format's objects, byte for byte (docs/format.md).

Chunk codec, index, point, deltas and packs, key layout, the sealed envelope.
"""
