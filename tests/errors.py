"""Shared test helper: bad input must raise one ValueError whose message is a single line."""

import pytest


def one_line_error(fn, *args, **kwargs) -> str:
    """Calls fn(*args, **kwargs), expects a ValueError with a non-empty one-line message; returns it."""
    with pytest.raises(ValueError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and message
    return message
