"""The one union-find of the vectoriser: the seam joiner and the minimum mapping unit's patch graph both use it."""

from __future__ import annotations

from collections.abc import Iterable


class UnionFind:
    """Disjoint sets of integer nodes, with path halving and union by size.

    Nodes can be added while work arrives and a whole set removed once it is done, so a streaming user
    (the seam joiner) holds only the sets still open, not every node it has ever seen.
    """

    def __init__(self, nodes: Iterable[int] = ()) -> None:
        self._parent: dict[int, int] = {}
        self._size: dict[int, int] = {}  # root -> nodes in its set
        for node in nodes:
            self.add(node)

    def add(self, node: int) -> None:
        """A new node, alone in its set."""
        self._parent[node] = node
        self._size[node] = 1

    def find(self, x: int) -> int:
        """The root of ``x``'s set."""
        p = self._parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> tuple[int, int]:
        """Join the sets of ``a`` and ``b``; returns (root kept, root absorbed), the same root twice when they
        were one set already. The larger set's root is kept (``a``'s on a tie), so a caller that keeps data per
        root moves the smaller side's into the larger."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra, ra
        if self._size[ra] < self._size[rb]:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._size[ra] += self._size.pop(rb)
        return ra, rb

    def remove(self, nodes: Iterable[int]) -> None:
        """Forget the nodes of one whole set (all of them: a set left in part would lose its root)."""
        for node in nodes:
            del self._parent[node]
            self._size.pop(node, None)

    def __len__(self) -> int:
        """Nodes held."""
        return len(self._parent)
