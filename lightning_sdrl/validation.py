"""Argument checks shared by the modules and DataModules, with errors that name the argument."""

from __future__ import annotations


def check_positive_ints(**values: int) -> None:
    """Raise ``ValueError("name=value; expected a positive integer")`` for the first value below 1.

    Example:
        >>> check_positive_ints(batch_size=4, num_batches=0)
        Traceback (most recent call last):
        ...
        ValueError: num_batches=0; expected a positive integer
    """
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name}={value}; expected a positive integer")
