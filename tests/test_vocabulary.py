"""One vocabulary: a spec operation and its fast / kernels twin share name, arguments and result.

``TWINS`` is the single table of pairs (ARCHITECTURE.md prints the same table). For each pair the
test compares the public signatures: the name, the parameter names in order, their kinds
(positional or keyword-only) and defaults, and the shape of the return annotation (``None``, an
array, a tuple of how many, a list, a scalar type). A twin may add keyword-only parameters with
defaults after the shared ones (``backend``, ``out``...), listed in its row; any other difference
is written in the row with the reason, so renaming or reordering a parameter anywhere fails here.

Every public function and class of the spec modules that have twins is classified: it has a twin
(``TWINS``), is re-used as the same object (``SHARED``), or is spec-only (``SPEC_ONLY``, with the
reason). A new spec operation therefore has to be placed in the table before the suite passes.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

RESTRUCTURE = "fast/blocks restructure in progress"


@dataclass(frozen=True)
class Differs:
    """A documented difference of one operation between the spec and its twin."""

    why: str
    params: tuple[str, ...] | None = None  # the twin's parameter names, where they differ
    returns: bool = False  # the return shapes differ


@dataclass(frozen=True)
class Twin:
    """One row of the table: an operation in the spec and its counterpart in fast or kernels."""

    spec: str  # "module:qualname"
    other: str  # "module:qualname"
    extras: tuple[str, ...] = ()  # parameters only the twin takes, after the shared ones
    positional_extras: bool = False  # numba functions take no keyword-only parameters
    differs: Differs | None = None  # for a function
    members: Mapping[str, Differs] = field(default_factory=dict)  # for a class, per member
    spec_only: Mapping[str, str] = field(default_factory=dict)  # class members only in the spec
    attributes: tuple[str, ...] = ()  # spec properties the twin holds as instance attributes
    closed: bool = False  # class: the twin has no public member beyond the spec's
    fast_only: Mapping[str, str] = field(default_factory=dict)  # closed class: why it has these
    pending: str | None = None  # the twin is not renamed yet: expected to fail (strict)


_FORK = (
    "the engine's Sequence objects instead of ids; the child's first token is already in "
    "child.token_ids, so the step's outcome leaves the child out"
)

TWINS: tuple[Twin, ...] = (
    # -- the KV cache and attention: spec (numpy float64) and kernels (torch) ------------------
    Twin("spec.kv_cache:write_kv", "kernels:write_kv", extras=("backend",)),
    Twin("spec.kv_cache:copy_blocks", "kernels:copy_blocks"),
    Twin("spec.kv_cache:swap_blocks", "kernels:swap_blocks"),
    Twin("spec.kv_cache:gather_kv", "kernels.torch_attention:gather_kv"),
    Twin("spec.kv_cache:check_cache_pair", "kernels.checks:check_cache_pair"),
    Twin(
        "spec.paged_decode:check_attention_inputs",
        "kernels.checks:check_attention_inputs",
        differs=Differs(
            "the spec returns the validated float64/int64 arrays, the kernels the AttentionDims "
            "their launch needs",
            returns=True,
        ),
    ),
    Twin(
        "spec.paged_decode:paged_decode",
        "kernels:paged_decode",
        extras=("num_splits", "out", "backend"),
    ),
    Twin(
        "spec.paged_prefill:paged_prefill",
        "kernels:paged_prefill",
        extras=("max_seqlen_q", "out", "backend"),
    ),
    # -- block management: spec and fast (numba) -----------------------------------------------
    Twin("spec.block_manager:BlockManager", "fast.blocks.manager:BlockManager"),
    Twin(
        "spec.prefix_cache:hash_block_tokens",
        "fast.blocks.hash:hash_block_tokens",
        extras=("has_extra_key",),
        positional_extras=True,
        differs=Differs("numba: extra_key is its utf-8 bytes as a uint8 array, None a False flag"),
    ),
    Twin(
        "spec.prefix_cache:chain_hashes",
        "fast.blocks.hash:chain_hashes",
        differs=Differs(
            "numba: extra_key as utf-8 bytes plus a flag for None, always the spec's hash (no "
            "hash_fn); an int64 array instead of a list",
            params=("token_ids", "block_size", "extra_key", "has_extra_key"),
            returns=True,
        ),
    ),
    # -- the scheduler: spec (ids) and fast (the engine's Sequence objects) --------------------
    Twin(
        "spec.scheduler:Scheduler",
        "fast.engine.scheduler:Scheduler",
        members={
            "add_request": Differs(
                "the engine's Sequence carries the id, the prompt and the arrival", ("seq",)
            ),
            "fork": Differs(_FORK, ("parent", "child")),
        },
        spec_only={
            "token_ids": "fast's Sequence objects carry them (scheduler.seqs[id].token_ids)",
            "num_computed": "fast's Sequence objects carry it (scheduler.seqs[id].num_computed)",
        },
        attributes=("waiting", "running", "swapped"),
        closed=True,
        fast_only={
            "continue_decodes": "overlapped scheduling (async_scheduling) records a step launched "
            "ahead; the spec's scheduler is synchronous",
            "in_flight": "the sequences of that step in flight (async_scheduling)",
        },
    ),
)

#: Spec objects that fast re-uses as they are (imported, never redefined).
SHARED: Mapping[str, tuple[str, ...]] = {
    "spec.block_manager:BlockManagerConfig": ("fast.blocks.manager",),
    "spec.scheduler:SchedulerConfig": ("fast.engine.scheduler",),
    "spec.scheduler:ScheduledSequence": ("fast.engine.scheduler",),
    "spec.scheduler:SchedulerOutput": ("fast.engine.scheduler",),
    "spec.scheduler:StepOutcome": ("fast.engine.scheduler",),
    "spec.scheduler:SchedulerOrderError": ("fast.engine.scheduler",),
    "spec.scheduler:BlockManagerLike": ("fast.engine.scheduler",),
}

_VALIDATION = "input validation; the kernels validate tensors in kernels.checks"
_MATH = "the dense reference math that defines paged attention; the kernels fuse it"
SPEC_ONLY: Mapping[str, str] = {
    "spec.kv_cache:check_cache": _VALIDATION,
    "spec.kv_cache:check_block_pairs": _VALIDATION + " (kernels.cache_ops.as_pairs)",
    "spec.kv_cache:slots_of": "slots come from the block manager's slot_mapping in fast",
    "spec.paged_decode:paged_decode_with_lse": "the kernels return no log-sum-exp",
    "spec.paged_prefill:paged_prefill_with_lse": "the kernels return no log-sum-exp",
    "spec.paged_prefill:query_positions": _MATH,
    "spec.paged_prefill:check_cu_seqlens": _VALIDATION + " (check_prefill)",
    "spec.prefix_cache:CachedBlock": "fast keeps the prefix index in numba arrays",
    "spec.prefix_cache:PrefixCache": "fast keeps the prefix index in numba arrays",
}

#: The spec modules whose every public function and class must be classified above.
SPEC_MODULES = (
    "spec.kv_cache",
    "spec.paged_decode",
    "spec.paged_prefill",
    "spec.block_manager",
    "spec.prefix_cache",
    "spec.scheduler",
)


# -- the comparison ------------------------------------------------------------------------------


def load(path: str) -> Any:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


_ARRAYS = {"F64", "I64", "U64", "Cache", "NDArray", "ArrayLike", "Tensor", "torch.Tensor"}


def shape(annotation: Any) -> str:
    """The shape of a return annotation: None, array, tuple(...), list, or the type's name."""
    if annotation is inspect.Signature.empty:
        return "?"
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    text = text.replace(" ", "").replace("'", "")
    alternatives = _split_top(text, "|")
    if len(alternatives) > 1:
        return "|".join(shape(a) for a in alternatives)
    match = re.fullmatch(r"tuple\[(.*)\]", text)
    if match:
        return "tuple(" + ",".join(shape(a) for a in _split_top(match.group(1), ",")) + ")"
    base = re.sub(r"\[.*\]$", "", text)
    if base in ("list", "Sequence"):
        return "list"
    return "array" if base in _ARRAYS else base


def _parameters(fn: Any) -> tuple[list[inspect.Parameter], Any]:
    sig = inspect.signature(getattr(fn, "py_func", fn))  # numba dispatchers wrap py_func
    params = [p for p in sig.parameters.values() if p.name != "self"]
    return params, sig.return_annotation


def signature_problems(
    spec_fn: Any,
    other_fn: Any,
    *,
    extras: tuple[str, ...] = (),
    positional_extras: bool = False,
    differs: Differs | None = None,
    where: str = "",
) -> list[str]:
    """What differs between two callables beyond what the table documents."""
    where = where or getattr(spec_fn, "__name__", "?")
    problems = []
    spec_name = getattr(getattr(spec_fn, "fget", spec_fn), "__name__", None)
    other_name = getattr(getattr(other_fn, "fget", other_fn), "__name__", None)
    if spec_name != other_name:
        problems.append(f"{where}: named {other_name!r}, the spec says {spec_name!r}")
    spec_params, spec_ret = _parameters(spec_fn)
    other_params, other_ret = _parameters(other_fn)
    shared = list(differs.params) if differs and differs.params else [p.name for p in spec_params]
    want = shared + list(extras)
    got = [p.name for p in other_params]
    if got != want:
        problems.append(f"{where}: parameters {got}, expected {want}")
        return problems
    for a, b in zip(spec_params, other_params[: len(shared)]):
        if a.kind != b.kind:
            problems.append(f"{where}: {b.name} is {b.kind.description}, not {a.kind.description}")
        renamed = differs is not None and differs.params is not None
        if not renamed and a.default is not b.default and a.default != b.default:
            problems.append(f"{where}: {b.name} defaults to {b.default!r}, not {a.default!r}")
    for p in other_params[len(shared) :]:
        if positional_extras:
            continue
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
            problems.append(
                f"{where}: extra parameter {p.name} must be keyword-only with a default"
            )
    if not (differs and differs.returns) and shape(spec_ret) != shape(other_ret):
        problems.append(f"{where}: returns {shape(other_ret)}, the spec {shape(spec_ret)}")
    return problems


def public_members(cls: type) -> dict[str, Any]:
    """Public methods and properties of ``cls`` (and ``__init__``), unwrapped."""
    out = {}
    for name in dir(cls):
        if name.startswith("_") and name != "__init__":
            continue
        member = inspect.getattr_static(cls, name)
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property) or inspect.isfunction(member):
            out[name] = member
    return out


def _assigns(cls: type, name: str) -> bool:
    """``cls.__init__`` sets ``self.<name>``."""
    source = inspect.getsource(cls.__init__)  # type: ignore[misc]
    return re.search(rf"self\.{name}\b\s*(:[^=\n]*)?=", source) is not None


def class_problems(spec_cls: type, other_cls: type, twin: Twin) -> list[str]:
    """What differs between two classes' public members beyond what the table documents."""
    problems = []
    spec_members, other_members = public_members(spec_cls), public_members(other_cls)
    for name in twin.spec_only:
        if name not in spec_members:
            problems.append(f"{name}: listed as spec-only but the spec has no such member")
        elif name in other_members:
            problems.append(f"{name}: listed as spec-only but {other_cls.__name__} has it")
    for name, member in spec_members.items():
        where = f"{spec_cls.__name__}.{name}"
        if name in twin.spec_only:
            continue
        if name in twin.attributes:
            if not _assigns(other_cls, name):
                problems.append(f"{where}: {other_cls.__name__} sets no attribute {name}")
            continue
        if name not in other_members:
            problems.append(f"{where}: missing from {other_cls.__module__}")
            continue
        other = other_members[name]
        if isinstance(member, property) != isinstance(other, property):
            kinds = (
                "a property" if isinstance(m, property) else "a method" for m in (member, other)
            )
            problems.append(f"{where}: {next(kinds)} in the spec, {next(kinds)} in the twin")
            continue
        if isinstance(member, property):
            member, other = member.fget, other.fget
        problems += signature_problems(member, other, differs=twin.members.get(name), where=where)
    if twin.closed:
        extra = sorted(set(other_members) - set(spec_members) - set(twin.fast_only))
        if extra:
            problems.append(f"{other_cls.__name__} has members the spec lacks: {extra}")
        stale = sorted(set(twin.fast_only) - set(other_members))
        if stale:
            problems.append(f"{other_cls.__name__} lacks the members said to be its own: {stale}")
    return problems


def twin_problems(twin: Twin) -> list[str]:
    spec_obj, other_obj = load(twin.spec), load(twin.other)
    if inspect.isclass(spec_obj):
        return class_problems(spec_obj, other_obj, twin)
    return signature_problems(
        spec_obj,
        other_obj,
        extras=twin.extras,
        positional_extras=twin.positional_extras,
        differs=twin.differs,
    )


def _checked(twin: Twin) -> list[str]:
    try:
        return twin_problems(twin)
    except (ImportError, AttributeError) as e:
        return [f"{twin.other}: {e}"]


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "twin",
    [
        pytest.param(
            t,
            id=t.spec.split(":")[1],
            marks=[pytest.mark.xfail(strict=True, reason=t.pending)] if t.pending else [],
        )
        for t in TWINS
    ],
)
def test_twin_has_the_spec_vocabulary(twin: Twin) -> None:
    assert _checked(twin) == []


@pytest.mark.parametrize("path", sorted(SHARED))
def test_shared_objects_are_the_spec_objects(path: str) -> None:
    name = path.split(":")[1]
    for module in SHARED[path]:
        assert getattr(importlib.import_module(module), name) is load(path), (path, module)


def test_every_spec_operation_is_in_the_table() -> None:
    placed = {t.spec for t in TWINS} | set(SHARED) | set(SPEC_ONLY)
    public = set()
    for name in SPEC_MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            defined_here = getattr(obj, "__module__", None) == name
            if not attr.startswith("_") and defined_here and callable(obj):
                public.add(f"{name}:{attr}")
    assert sorted(public - placed) == [], "spec operations missing from the vocabulary table"
    assert sorted(placed - public) == [], "table rows naming no public spec object"


def test_errors_are_one_family() -> None:
    import kernels
    from spec.attention import AttentionShapeError
    from spec.errors import PagedKVError

    for err in (AttentionShapeError, kernels.KernelInputError):
        assert issubclass(err, PagedKVError) and issubclass(err, ValueError), err
    import fast.blocks.manager
    import fast.engine.scheduler
    import spec.errors

    for module in (fast.blocks.manager, fast.engine.scheduler):
        for name, obj in vars(spec.errors).items():
            if isinstance(obj, type) and hasattr(module, name):
                assert getattr(module, name) is obj, f"{module.__name__}.{name} redefines it"


def test_the_engine_speaks_the_scheduler_vocabulary() -> None:
    from fast.engine.engine import LLMEngine

    for name in ("add_request", "abort_request", "has_unfinished_requests", "step"):
        assert inspect.isfunction(getattr(LLMEngine, name)), name


# -- the check catches drift: deliberately drifted fakes ------------------------------------------


def _named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A copy of ``fn`` (same signature) called ``name``."""

    @functools.wraps(fn)
    def copy(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    copy.__name__ = copy.__qualname__ = name
    return copy


def _spec_write_kv(k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any) -> None: ...


def _twin_write_kv(
    k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any, *, backend: str = "auto"
) -> None: ...


def _reordered(
    k_cache: Any, v_cache: Any, k: Any, v: Any, slot_mapping: Any, *, backend: str = "auto"
) -> None: ...


def _renamed_parameter(
    k: Any, v: Any, k_cache: Any, v_cache: Any, slots: Any, *, backend: str = "auto"
) -> None: ...


def _positional_extra(
    k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any, backend: str = "auto"
) -> None: ...


def _keyword_only_shared(
    k: Any, v: Any, k_cache: Any, v_cache: Any, *, slot_mapping: Any, backend: str = "auto"
) -> None: ...


def _returns_an_int(
    k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any, *, backend: str = "auto"
) -> int: ...


SPEC_FAKE = _named(_spec_write_kv, "write_kv")


def test_the_fake_twin_passes() -> None:
    twin = _named(_twin_write_kv, "write_kv")
    assert signature_problems(SPEC_FAKE, twin, extras=("backend",)) == []


@pytest.mark.parametrize(
    ("drifted", "needle"),
    [
        (_reordered, "parameters ['k_cache', 'v_cache', 'k', 'v'"),
        (_renamed_parameter, "parameters ['k', 'v', 'k_cache', 'v_cache', 'slots'"),
        (_positional_extra, "backend must be keyword-only"),
        (_keyword_only_shared, "slot_mapping is keyword-only"),
        (_returns_an_int, "returns int, the spec None"),
    ],
)
def test_drift_is_caught(drifted: Callable[..., Any], needle: str) -> None:
    problems = signature_problems(SPEC_FAKE, _named(drifted, "write_kv"), extras=("backend",))
    assert any(needle in p for p in problems), problems


def test_a_renamed_operation_is_caught() -> None:
    problems = signature_problems(SPEC_FAKE, _twin_write_kv, extras=("backend",))
    assert problems == ["write_kv: named '_twin_write_kv', the spec says 'write_kv'"]


class _SpecScheduler:
    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def waiting(self) -> tuple[int, ...]:
        return ()

    def has_unfinished_requests(self) -> bool:
        return False

    def update(self, outcome: Any) -> list[int]:
        return []


class _DriftedScheduler:
    def __init__(self, config: Any) -> None:
        self.waiting: list[Any] = []

    @property
    def has_unfinished_requests(self) -> bool:  # a property where the spec has a method
        return False

    def update(self, outcome: Any) -> None:  # returns nothing where the spec returns a list
        return None

    def abort(self, seq_id: int) -> None:  # a member the spec does not have
        return None


def test_class_drift_is_caught() -> None:
    twin = Twin("", "", attributes=("waiting",), closed=True)
    problems = class_problems(_SpecScheduler, _DriftedScheduler, twin)
    assert problems == [
        "_SpecScheduler.has_unfinished_requests: a method in the spec, a property in the twin",
        "_SpecScheduler.update: returns None, the spec list",
        "_DriftedScheduler has members the spec lacks: ['abort']",
    ]
    own = Twin("", "", attributes=("waiting",), closed=True, fast_only={"abort": "why"})
    assert class_problems(_SpecScheduler, _DriftedScheduler, own)[2:] == []
    stale = Twin("", "", attributes=("waiting",), closed=True, fast_only={"gone": "why"})
    assert class_problems(_SpecScheduler, _DriftedScheduler, stale)[2:] == [
        "_DriftedScheduler has members the spec lacks: ['abort']",
        "_DriftedScheduler lacks the members said to be its own: ['gone']",
    ]
    missing = class_problems(_SpecScheduler, _DriftedScheduler, Twin("", ""))
    assert any(p.startswith("_SpecScheduler.waiting: missing from") for p in missing), missing
