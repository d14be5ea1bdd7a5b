"""What a user's ``connect_options`` may not change: the transport and the source connect
and reconnect themselves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cqrskit.errors import ConfigurationError

__all__ = ["check_connect_options"]

# the client's own reconnect loop: with it on, the client resends buffered publishes on
# a new connection after ones lost with the old socket (a partition stored out of order),
# and a negative max_reconnect_attempts makes even the first connect retry forever
_RECONNECT = ("allow_reconnect", "max_reconnect_attempts", "reconnect_time_wait")


def check_connect_options(options: Mapping[str, Any] | None, owner: str) -> dict[str, Any]:
    """A copy of ``options`` for ``nats.connect``, refused if it turns on the client's own
    reconnects or names the servers.

    Raises:
        ConfigurationError: ``allow_reconnect`` (other than ``False``),
            ``max_reconnect_attempts``, ``reconnect_time_wait`` or ``servers`` is given.
    """
    out = dict(options or {})
    if "servers" in out:
        raise ConfigurationError(
            f"{owner}: connect_options may not hold 'servers'.",
            hint=f"give the servers as {owner}'s first argument.",
        )
    if out.get("allow_reconnect", False) is False:
        out.pop("allow_reconnect", None)
    taken = [k for k in _RECONNECT if k in out]
    if taken:
        raise ConfigurationError(
            f"{owner}: connect_options may not set {', '.join(taken)}: {owner} turns the "
            "client's own reconnects off and reconnects at its next call, so that no "
            "message of a partition is resent, or read, out of order.",
            hint="leave the reconnect options out; the relay and the consumer back off and "
            "reconnect by themselves (their max_backoff bounds the pause).",
        )
    return out
