"""The bound of a graceful stop, shared by the long-running workers.

:class:`~cqrskit.projections.Projector`, :class:`~cqrskit.projections.PartitionedProjector`,
:class:`~cqrskit.messaging.Relay` and :class:`~cqrskit.messaging.Consumer` take a
``stop_timeout`` (and ``stop(timeout)``): how long their batches in flight may take to
finish on stop before they are abandoned (cancelled, rolled back) and the leases released.
"""

from __future__ import annotations

import math

from cqrskit.errors import ConfigurationError

__all__ = ["check_stop_timeout"]


def check_stop_timeout(value: float, name: str = "stop_timeout") -> float:
    """Return ``value`` as a float if it is a finite number of seconds >= 0.

    Raises:
        ConfigurationError: it is not (the message names ``name``).
    """
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigurationError(
            f"{name} must be a finite number of seconds >= 0 (0 abandons the batches in "
            f"flight at once), not {value!r}."
        )
    return seconds
