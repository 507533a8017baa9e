"""Torch-free primitives both sides read: the manifest, the bundle on disk, what each artifact format is,
preprocessing, the CPU and library facts, atomic file writing, and table formatting."""
