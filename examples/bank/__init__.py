"""A small bank on cqrskit: accounts, deposits, withdrawals and transfers.

Modules, in the order to read them:

* :mod:`~examples.bank.domain` — commands, queries, events and the domain error;
* :mod:`~examples.bank.handlers` — the command and query handlers (event-sourced accounts);
* :mod:`~examples.bank.projections` — ``balances`` (inline) and ``history`` (async);
* :mod:`~examples.bank.app` — wiring: store, read databases, behaviors, mediator;
* :mod:`~examples.bank.api` — the HTTP API (FastAPI; imported only for ``--serve``);
* :mod:`~examples.bank.demo` — what ``python -m examples.bank`` runs.
"""
