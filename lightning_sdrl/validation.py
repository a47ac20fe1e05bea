"""Argument checks shared by the modules and DataModules, with errors that name the argument."""

from __future__ import annotations


def check_positive_ints(**values: int) -> None:
    """Raise ``ValueError("name=value; expected a positive integer")`` for the first value that is not an int >= 1.

    Example:
        >>> check_positive_ints(batch_size=4, num_batches=0)
        Traceback (most recent call last):
        ...
        ValueError: num_batches=0; expected a positive integer
        >>> check_positive_ints(subset_size=2.5)
        Traceback (most recent call last):
        ...
        ValueError: subset_size=2.5; expected a positive integer
    """
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive integer")
