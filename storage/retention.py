"""Which checkpoints garbage collection deletes (a pure function, easy to test)."""

from __future__ import annotations

from collections.abc import Iterable


def steps_to_delete(
    steps: Iterable[int],
    keep_last: int,
    keep_every: int | None = None,
    protect: Iterable[int] = (),
    newest_verified: int | None = None,
) -> list[int]:
    """Committed steps that the policy lets go, ascending.

    Kept: the newest ``keep_last`` steps, every step divisible by ``keep_every``, the steps in
    ``protect`` and ``newest_verified`` (the one resume would use; kept even when newer steps
    exist, since they may all be corrupt).

    Raises:
        ValueError: keep_last < 1 (the newest may be the only good one) or keep_every < 1.
    """
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last!r}: the newest checkpoint is always kept")
    if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
        raise ValueError(f"keep_every must be >= 1 or None, got {keep_every!r}")
    ordered = sorted(set(steps))
    keep = set(ordered[-keep_last:]) | set(protect)
    if keep_every is not None:
        keep |= {s for s in ordered if s % keep_every == 0}
    if newest_verified is not None:
        keep.add(newest_verified)
    return [s for s in ordered if s not in keep]
