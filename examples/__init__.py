"""Example applications built on cqrskit's public API (run ``python -m examples.bank``)."""
