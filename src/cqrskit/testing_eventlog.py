"""Former home of the event-store conformance kit, now :mod:`cqrskit.testing.eventlog`;
this import path keeps working."""

from cqrskit.testing.eventlog import Deposited, EventStoreConformance, Opened, wait_visible

__all__ = ["Deposited", "EventStoreConformance", "Opened", "wait_visible"]
