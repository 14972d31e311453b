"""Every repository path and module the documents name exists, so the docs cannot drift.

The README, ARCHITECTURE.md and the Sphinx pages under ``docs/`` are scanned for

* repository paths (``fast/engine/batch.py``, ``tests/kernels``, ``benchmarks/results/*.json``,
  ``tests/fast/{blocks,engine}``, ``./scripts/setup``, ``.ci/run``): each must match at least one
  file or folder of the checkout;
* dotted names under our import packages (``fast.engine.scheduler.Scheduler``,
  ``spec.kv_cache.write_kv``, ``kernels.paged_decode``, ``conformance.blocks.lockstep``): the
  longest module prefix must import and the rest must resolve as attributes.
"""

from __future__ import annotations

import importlib
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("fast", "spec", "kernels", "conformance", "tests", "benchmarks", "docs", "scripts", r"\.ci")
PACKAGES = ("fast", "spec", "kernels", "conformance")
FILE_SUFFIXES = {"md", "py", "json", "toml", "txt", "gguf", "html"}

# Not preceded by a word character, a slash or a dot, so URLs and longer paths do not match.
_PATH = re.compile(rf"(?<![\w/.-])(?:\./)?(?:{'|'.join(TOP)})/[\w./*{{}},-]*")
_DOTTED = re.compile(rf"(?<![\w/.-])(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+")


def _expand_braces(path: str) -> list[str]:
    """``a/{b,c}/d`` -> ``["a/b/d", "a/c/d"]`` (one level of braces per group)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def _references(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for doc in DOCUMENTS:
        for match in pattern.finditer(doc.read_text(encoding="utf-8")):
            ref = match.group(0).split("::")[0].rstrip(".,").removeprefix("./")
            if "," in ref and "{" not in ref:  # a list in prose: "fast/, spec/"
                ref = ref.split(",")[0]
            found.add((doc.relative_to(ROOT).as_posix(), ref))
    return sorted(found)


PATHS = _references(_PATH)
NAMES = [
    (doc, ref) for doc, ref in _references(_DOTTED) if ref.rsplit(".", 1)[1] not in FILE_SUFFIXES
]


def test_the_scan_finds_references() -> None:
    assert len(PATHS) > 20 and len(NAMES) > 20  # a broken pattern must not pass vacuously


@pytest.mark.parametrize(("doc", "ref"), PATHS, ids=[f"{d}:{r}" for d, r in PATHS])
def test_path_exists(doc: str, ref: str) -> None:
    missing = [p for p in _expand_braces(ref) if not any(ROOT.glob(p.rstrip("/")))]
    assert not missing, f"{doc} names {ref!r}; nothing in the repository matches {missing}"


def _resolve(name: str) -> object:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # no such module: try a shorter prefix, the rest are attributes
            raise
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize(("doc", "ref"), NAMES, ids=[f"{d}:{r}" for d, r in NAMES])
def test_name_resolves(doc: str, ref: str) -> None:
    try:
        _resolve(ref)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{doc} names {ref!r}, which does not resolve: {exc}")
