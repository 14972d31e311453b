"""Named errors and warnings of the user-facing layer (``LLM`` and ``pagedkv``).

Each is a :class:`~spec.errors.PagedKVError`, so ``except PagedKVError`` catches every refusal
of pagedkv, and each carries the offending values as attributes.

>>> from fast.api.errors import InvalidMessageError, UnknownArgumentError
>>> err = InvalidMessageError(1, {"role": "user"}, "has no 'content'")
>>> err.index, str(err)
(1, "invalid messages[1]={'role': 'user'}: has no 'content'")
>>> str(UnknownArgumentError("LLM", "max_num_seq", ["max_num_seqs"]))
"LLM() got an unknown keyword argument 'max_num_seq'; did you mean max_num_seqs?"
"""

from __future__ import annotations

from collections.abc import Sequence

from spec.errors import InvalidArgumentError, PagedKVError

__all__ = [
    "ChatTemplateError",
    "DeviceUnavailableError",
    "IgnoredArgumentWarning",
    "InvalidMessageError",
    "UnknownArgumentError",
    "UnsupportedArgumentError",
]


class UnknownArgumentError(PagedKVError, TypeError):
    """A keyword argument that neither pagedkv nor vLLM knows (a misspelling, usually).

    Attributes: ``function`` (who was called), ``name`` (the argument), ``close_matches``
    (known names that look like it, best first).
    """

    def __init__(self, function: str, name: str, close_matches: Sequence[str]) -> None:
        self.function = function
        self.name = name
        self.close_matches = list(close_matches)
        hint = f"; did you mean {' or '.join(self.close_matches)}?" if self.close_matches else ""
        super().__init__(f"{function}() got an unknown keyword argument {name!r}{hint}")


class UnsupportedArgumentError(InvalidArgumentError):
    """A vLLM argument whose value pagedkv cannot honour (``pipeline_parallel_size=2``...)."""


class DeviceUnavailableError(InvalidArgumentError):
    """The requested device does not exist on this machine (``device="cuda"`` without CUDA)."""


class InvalidMessageError(InvalidArgumentError):
    """A chat message that is not ``{"role": <known role>, "content": <text>}``.

    Attributes: ``conversation`` (its index in a batch of conversations, None for a single
    conversation), ``index`` (the message's index in its conversation), ``value``, ``reason``.
    """

    def __init__(
        self, index: int, message: object, reason: str, conversation: int | None = None
    ) -> None:
        self.conversation = conversation
        self.index = index
        where = (
            f"messages[{index}]" if conversation is None else f"messages[{conversation}][{index}]"
        )
        super().__init__(where, message, reason)


class ChatTemplateError(InvalidArgumentError):
    """The chat template is missing, or refused to render a conversation (its own check)."""


class IgnoredArgumentWarning(UserWarning):
    """A vLLM argument that has no effect in pagedkv was given a value that asks for one."""
