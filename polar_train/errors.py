"""User-facing errors: one message, no traceback, a non-zero exit (see cli.main)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (data, config, checkpoint, CLI); exits with code 2.

    The message reads ``<where>: <what is wrong> (<what was expected or how to fix it>)``,
    where ``where`` is ``FILE:LINE``, a dotted config key or a path.

    >>> str(UserError("data/train.jsonl:7", "field 'chosen' is missing", "add a string or a message list"))
    "data/train.jsonl:7: field 'chosen' is missing (add a string or a message list)"
    """

    exit_code = 2

    def __init__(self, where: str, what: str, fix: str = "") -> None:
        self.where, self.what, self.fix = str(where), what, fix
        super().__init__(f"{self.where}: {what}" + (f" ({fix})" if fix else ""))


class TrainingError(UserError):
    """A failure inside training (non-finite losses, a failed save, a dead rank); exit code 1."""

    exit_code = 1
