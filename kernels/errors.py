"""The one exception the kernels raise.

It lives with the kernels, which import nothing from ``stager`` outside ``stager.kernels``, so it
is a plain ``ValueError`` and not a ``stager.errors.StagerError``; ``stager.errors`` and
``stager`` re-export it as ``RegionTableError``.
"""

from __future__ import annotations

__all__ = ["RegionTableError"]


class RegionTableError(ValueError):
    """A pack/unpack region table is malformed (bad dtype or shape, overlap, out of bounds)."""
