"""The error hierarchy and the structured attributes every error carries."""

from dataclasses import dataclass

import pytest

from cqrskit import errors
from cqrskit.errors import (
    ConcurrencyError,
    ConfigurationError,
    ConsistencyError,
    CqrsError,
    DependencyError,
    DispatchError,
    DispatchTimeoutError,
    FieldError,
    IdempotencyError,
    MissingExtraError,
    NoHandlerError,
    NotAuthorizedError,
    NotFoundError,
    PersistenceError,
    PublishError,
    RegistrationError,
    SerializationError,
    StaleReadError,
    TokenFromFutureError,
    TransportError,
    ValidationError,
    WrongMessageKindError,
    describe,
)
from cqrskit.messages import Command


@dataclass(frozen=True)
class Pay(Command[None]):
    amount: int


def pay_handler(cmd: Pay) -> None:
    return None


@pytest.mark.parametrize(
    ("error", "parents"),
    [
        (ConfigurationError, (CqrsError,)),
        (RegistrationError, (ConfigurationError,)),
        (DependencyError, (ConfigurationError,)),
        (MissingExtraError, (ConfigurationError, ImportError)),
        (DispatchError, (CqrsError,)),
        (NoHandlerError, (DispatchError,)),
        (WrongMessageKindError, (DispatchError, TypeError)),
        (PublishError, (DispatchError,)),
        (ValidationError, (DispatchError, ValueError)),
        (NotAuthorizedError, (DispatchError, PermissionError)),
        (NotFoundError, (DispatchError, LookupError)),
        (DispatchTimeoutError, (DispatchError, TimeoutError)),
        (ConcurrencyError, (CqrsError,)),
        (PersistenceError, (CqrsError,)),
        (SerializationError, (PersistenceError, ValueError)),
        (IdempotencyError, (PersistenceError,)),
        (ConsistencyError, (CqrsError,)),
        (StaleReadError, (ConsistencyError,)),
        (TokenFromFutureError, (ConsistencyError, ValueError)),
        (TransportError, (CqrsError,)),
    ],
)
def test_hierarchy(error: type[Exception], parents: tuple[type[Exception], ...]) -> None:
    for parent in parents:
        assert issubclass(error, parent)
    assert issubclass(error, CqrsError)
    assert error.__name__ in errors.__all__
    assert error.__name__ in (errors.__doc__ or "")  # the tree in the docstring is complete


def test_attributes_and_rendering() -> None:
    err = NoHandlerError("no handler for Pay.", message_type=Pay, handler=pay_handler, hint="add")
    assert err.text == "no handler for Pay."
    assert err.message_type is Pay
    assert err.handler is pay_handler
    assert err.hint == "add"
    assert str(err) == "no handler for Pay. Hint: add"
    bare = CqrsError("plain")
    assert (bare.message_type, bare.handler, bare.hint) == (None, None, None)
    assert str(bare) == "plain"


def test_dependency_error_carries_the_dependency() -> None:
    err = DependencyError("no provider", dependency=int, message_type=Pay)
    assert err.dependency is int
    assert err.message_type is Pay


def test_missing_extra_names_the_extra() -> None:
    err = MissingExtraError("postgres", "asyncpg")
    assert err.extra == "postgres"
    assert "'asyncpg'" in str(err)
    assert err.hint == "install it with: pip install 'cqrskit[postgres]'"


def test_publish_error_lists_failures() -> None:
    boom = ValueError("boom")
    err = PublishError(Pay, [(pay_handler, boom)])
    assert err.failures == [(pay_handler, boom)]
    assert err.exceptions == [boom]
    assert err.__cause__ is boom
    assert err.handler is pay_handler
    assert f"{__name__}.pay_handler raised ValueError: boom" in str(err)
    empty = PublishError(Pay, [])
    assert empty.handler is None
    assert empty.__cause__ is None


def test_validation_error_and_field_errors() -> None:
    err = ValidationError({"amount": "must be positive", "to": "required"}, message_type=Pay)
    assert err.errors == [FieldError("amount", "must be positive"), FieldError("to", "required")]
    assert str(err) == f"invalid {__name__}.Pay: amount: must be positive; to: required"
    assert ValidationError([FieldError("a", "b")]).text == "invalid message: a: b"
    field = FieldError("a", "b")
    assert field.as_dict() == {"field": "a", "message": "b"}
    assert hash(field) == hash(FieldError("a", "b"))
    assert field != FieldError("a", "c")
    assert field != ("a", "b")
    assert repr(field) == "FieldError('a', 'b')"


def test_concurrency_error_attributes() -> None:
    err = ConcurrencyError("conflict", stream="acc-1", expected_version=3, actual_version=4)
    assert (err.stream, err.expected_version, err.actual_version) == ("acc-1", 3, 4)


def test_describe() -> None:
    assert describe(None) == "None"
    assert describe(Pay) == f"{__name__}.Pay"
    assert describe(pay_handler) == f"{__name__}.pay_handler"
    assert describe(int) == "int"
    assert describe(Pay(1)) == f"{__name__}.Pay"
