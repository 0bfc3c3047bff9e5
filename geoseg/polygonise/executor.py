"""Running the vectoriser's jobs: Ray tasks when Ray is up (``ray.is_initialized()``), else plain calls in this
process; one ordered queue that every stage of the package (the sieve's first pass, the blocks, the merges) uses."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, cast

from geoseg import storage

if TYPE_CHECKING:
    from ray import ObjectRef

T = TypeVar("T")
A = TypeVar("A")
Handle: TypeAlias = "T | ObjectRef[T]"
"""A job's result as handed on to another job: the value itself, or on Ray its object reference (which Ray
resolves when the reference is an argument of a task), so the value need not pass through the driver."""


class Jobs(Generic[T]):
    """An ordered queue of jobs: Ray tasks when Ray is up, else plain calls made when the result is taken.

    Results are taken in submission order (the output is deterministic), and at most two jobs per
    cluster CPU are in flight, so the driver holds a bounded number of results. A job submitted with
    ``returns=2`` (a function returning a pair) hands the driver its first value and only a
    :data:`Handle` on its second: on Ray that stays in the object store until a later job takes it.
    """

    def __init__(self) -> None:
        import ray  # here, not at import: a local run and the tests of the pure code do without Ray's import

        self._ray = ray if ray.is_initialized() else None
        self.window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1))) if self._ray else 1
        self._remotes: dict[Callable[..., Any], Any] = {}
        self._pending: deque[Callable[[], T]] = deque()

    def __len__(self) -> int:
        """Jobs submitted and not yet taken."""
        return len(self._pending)

    def submit(self, fn: Callable[..., T], *args: object, returns: int = 1) -> None:
        """Queue ``fn(*args)``; on Ray it starts now (arguments that are object references are resolved)."""
        if self._ray is None:
            self._pending.append(functools.partial(fn, *args))
            return
        if fn not in self._remotes:
            self._remotes[fn] = self._ray.remote(num_cpus=1, max_retries=2,
                                                 runtime_env={"env_vars": storage.task_env()})(fn)
        refs = self._remotes[fn].options(num_returns=returns).remote(*args)
        get = self._ray.get
        if returns == 1:
            self._pending.append(lambda: cast(T, get(refs)))
        else:  # the first value comes to the driver, the second stays a reference: T admits a Handle there
            self._pending.append(lambda: cast(T, (get(refs[0]), refs[1])))

    def fill(self, fn: Callable[[A], T], todo: Iterator[A], returns: int = 1) -> None:
        """Submit ``fn`` over the next items of ``todo`` until the window is full or ``todo`` is exhausted."""
        while len(self._pending) < self.window:
            item = next(todo, None)
            if item is None:
                return
            self.submit(fn, item, returns=returns)

    def take(self) -> T:
        """The oldest job's result (waits for it)."""
        return self._pending.popleft()()


def map_in_order(fn: Callable[[A], T], items: Iterable[A]) -> Iterator[T]:
    """Results of ``fn`` over the items, in order, through :class:`Jobs` (a bounded number in flight)."""
    jobs: Jobs[T] = Jobs()
    todo = iter(items)
    jobs.fill(fn, todo)
    while jobs:
        result = jobs.take()
        jobs.fill(fn, todo)
        yield result
