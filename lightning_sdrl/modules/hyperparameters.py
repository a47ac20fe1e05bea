"""What a module records as hyper-parameters: exactly its own constructor's arguments.

A checkpoint's ``hyper_parameters`` go back into the constructor of the class that wrote it: the
command line's ``validate`` / ``fit --ckpt_path`` feed them to ``type(module)(**hparams)``, as does
``load_from_checkpoint``. Lightning's ``save_hyperparameters`` collects the arguments of every
``__init__`` on the inheritance path, so a subclass that renames or fixes a parent's arguments
(GRPO's ``noise_level`` is DDPO's ``eta``; its advantage rule is fixed) would record arguments its
own constructor refuses. :func:`record_arguments` keeps only the concrete class's, and gives the
training loop its own resolved view (``settings``) under the loop's names.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.data import AttributeDict


def record_arguments(
    module: pl.LightningModule, ignore: Iterable[str] = (), arguments: dict[str, Any] | None = None
) -> AttributeDict:
    """Save ``type(module).__init__``'s arguments as hyper-parameters; return the caller's as settings.

    Call it from an ``__init__`` (any class on the path: a base's constructor called through
    ``super().__init__`` records the concrete subclass's arguments, never its own extra ones).

    Args:
        module: the module being constructed.
        ignore: arguments not recorded (objects given as config: policies, rewards, optimisers).
        arguments: the calling constructor's arguments (``dict(locals())`` at its top); they become
            the returned settings, minus ``ignore``, ``self`` and ``__class__``.

    Returns:
        The caller's arguments by name, what its training loop reads (empty without ``arguments``).
    """
    ignore = list(ignore)
    caller = inspect.currentframe()
    module.save_hyperparameters(ignore=ignore, frame=caller.f_back if caller is not None else None)
    own = inspect.signature(type(module).__init__).parameters
    for key in [k for k in module.hparams if not k.startswith("_") and k not in own]:
        del module.hparams[key]  # a parent's argument that the concrete class does not take
    skipped = {*ignore, "self", "__class__"}
    return AttributeDict({k: v for k, v in (arguments or {}).items() if k not in skipped})
