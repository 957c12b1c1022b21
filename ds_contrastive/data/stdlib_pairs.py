"""A built-in dataset of real text pairs, derived locally from the Python standard library.

Contrastive training and retrieval evaluation need (query, document) pairs of
real language, but tests and smoke runs cannot download a dataset. Every
Python installation ships thousands of documented functions, classes and
methods whose docstrings open with a one-line summary followed by a longer
explanation. The summary is a natural "query" and the explanation its
"document", so (summary, rest of docstring) pairs form a small retrieval task
with no download and no licence question beyond Python's own.

The pairs depend only on the Python version and platform (``os`` and
``subprocess`` document what the platform has; an interpreter built without an
optional extension such as ``_ssl``, ``_lzma`` or ``_sqlite3`` skips the module
that needs it): the module list is fixed and sorted, members are ordered by
qualified name, and the train / held-out split hashes the text itself rather
than relying on list order or ``hash()`` (which is salted per process).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ClassMethodDescriptorType, MethodDescriptorType, ModuleType

Pair = tuple[str, str]

# Standard-library modules whose import has no visible side effects (no GUI, no
# network, no output, no threads). All are pure Python except ``builtins``,
# which is compiled into every interpreter and documents str, dict, list and
# friends. Packages whose ``__init__`` only re-exports are listed by
# submodule, because a member is kept only in the module that defines it.
# Deprecated modules (PEP 594, lib2to3) and those needing Tk or curses are left
# out. Sorted at import so the walk order never depends on how this is written.
MODULES: tuple[str, ...] = tuple(
    sorted(
        """
        abc argparse ast asyncio.base_events asyncio.base_futures asyncio.base_subprocess
        asyncio.base_tasks asyncio.coroutines asyncio.events asyncio.exceptions
        asyncio.format_helpers asyncio.futures asyncio.locks asyncio.proactor_events
        asyncio.protocols asyncio.queues asyncio.runners asyncio.selector_events asyncio.sslproto
        asyncio.staggered asyncio.streams asyncio.subprocess asyncio.taskgroups asyncio.tasks
        asyncio.threads asyncio.timeouts asyncio.transports asyncio.unix_events base64 bdb bisect
        builtins bz2 cProfile calendar cmd code codecs codeop collections collections.abc colorsys
        compileall concurrent.futures._base concurrent.futures.process concurrent.futures.thread
        configparser contextlib copy copyreg csv ctypes ctypes.util dataclasses datetime dbm
        dbm.dumb decimal difflib dis doctest email.base64mime email.charset email.contentmanager
        email.encoders email.errors email.feedparser email.generator email.header
        email.headerregistry email.iterators email.message email.mime.application email.mime.audio
        email.mime.base email.mime.image email.mime.message email.mime.multipart
        email.mime.nonmultipart email.mime.text email.parser email.policy email.quoprimime
        email.utils encodings.idna encodings.punycode enum filecmp fileinput fnmatch fractions
        ftplib functools genericpath getopt getpass gettext glob graphlib gzip hashlib heapq hmac
        html html.parser http.client http.cookiejar http.cookies http.server imaplib importlib.abc
        importlib.machinery importlib.metadata importlib.readers importlib.resources
        importlib.resources.abc importlib.resources.readers importlib.resources.simple
        importlib.util inspect io ipaddress json json.decoder json.encoder json.scanner keyword
        linecache locale logging logging.config logging.handlers lzma mailbox mimetypes modulefinder
        multiprocessing.connection multiprocessing.context multiprocessing.heap
        multiprocessing.managers multiprocessing.pool multiprocessing.process multiprocessing.queues
        multiprocessing.reduction multiprocessing.resource_sharer multiprocessing.resource_tracker
        multiprocessing.shared_memory multiprocessing.sharedctypes multiprocessing.spawn
        multiprocessing.synchronize multiprocessing.util netrc ntpath nturl2path numbers opcode
        operator optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib
        posixpath pprint profile pstats pty py_compile pyclbr pydoc queue quopri random re reprlib
        runpy sched secrets selectors shelve shlex shutil signal site smtplib socket socketserver
        sqlite3.dbapi2 sqlite3.dump ssl stat statistics string stringprep struct subprocess symtable
        sysconfig tabnanny tarfile tempfile textwrap threading timeit token tokenize tomllib trace
        traceback tracemalloc tty types typing unittest.async_case unittest.case unittest.loader
        unittest.main unittest.mock unittest.result unittest.runner unittest.signals unittest.suite
        unittest.util urllib.error urllib.parse urllib.request urllib.response urllib.robotparser
        uuid venv warnings wave weakref webbrowser wsgiref.handlers wsgiref.headers
        wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom.domreg xml.dom.expatbuilder
        xml.dom.minicompat xml.dom.minidom xml.dom.pulldom xml.dom.xmlbuilder
        xml.etree.ElementInclude xml.etree.ElementPath xml.etree.ElementTree xml.sax
        xml.sax.expatreader xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client
        xmlrpc.server zipapp zipfile zipimport zoneinfo
        """.split()
    )
)

MIN_SUMMARY_WORDS = 4
MAX_SUMMARY_WORDS = 40
MIN_REST_WORDS = 12
MAX_REST_CHARS = 1200

# A paragraph that is only call signatures, e.g. "S.find(sub[, start]) -> int".
_SIGNATURE = re.compile(r"^(?:[\w.]+\(.*\)(?:\s*->.*)?\s*)+$")
# The gap after a sentence: end punctuation, whitespace, then a capital or opening quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'`(])")
# How methods of classes written in C appear in the class ``__dict__``.
_C_METHODS = (MethodDescriptorType, ClassMethodDescriptorType)


def stdlib_pairs(max_pairs: int | None = None) -> list[Pair]:
    """(summary line, rest of docstring) pairs from documented stdlib members.

    Pairs are ordered by the member's qualified name (``module.Class.method``);
    a pair whose summary or rest repeats an earlier pair's text is dropped, so
    every query has exactly one matching document. ``max_pairs`` keeps the
    first pairs of that order. Python 3.11 on Linux gives about 1,400 pairs.
    """
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0, got {max_pairs}")
    with warnings.catch_warnings():  # importing and reading deprecated members warns; that is not news here
        warnings.simplefilter("ignore")
        members = sorted(_documented_members(), key=lambda item: item[0])
    seen_summaries: set[str] = set()
    seen_rests: set[str] = set()
    pairs: list[Pair] = []
    for _, doc in members:
        pair = docstring_pair(doc)
        if pair is None or pair[0] in seen_summaries or pair[1] in seen_rests:
            continue
        seen_summaries.add(pair[0])
        seen_rests.add(pair[1])
        pairs.append(pair)
    return pairs if max_pairs is None else pairs[:max_pairs]


def docstring_pair(doc: str) -> Pair | None:
    """Split a cleaned docstring into (summary, rest), or None when it is not a usable pair.

    The summary is the first blank-line-separated paragraph; the rest is every
    later paragraph. Two common departures from PEP 257 are repaired so their
    text is not lost: a leading call-signature paragraph (``S.find(sub) -> int``,
    the old C-docstring style) is skipped, and a docstring that is one single
    paragraph is split after its first sentence (the summary Sphinx autosummary
    would take). Both sides are collapsed to single-spaced text, and the rest
    is capped at about ``MAX_REST_CHARS`` so one huge docstring cannot dominate
    a batch's token budget.
    """
    paragraphs = _paragraphs(doc)
    if len(paragraphs) < 2:
        return None
    summary = _one_line(paragraphs[0])
    rest = _truncate_words(_one_line(" ".join(paragraphs[1:])), MAX_REST_CHARS)
    if not MIN_SUMMARY_WORDS <= len(summary.split()) <= MAX_SUMMARY_WORDS:
        return None
    if len(rest.split()) < MIN_REST_WORDS:
        return None
    return summary, rest


def _paragraphs(doc: str) -> list[str]:
    """Blank-line-separated paragraphs of ``doc``, signatures dropped, an unseparated summary sentence split off."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]
    while paragraphs and _SIGNATURE.match(paragraphs[0]):
        paragraphs.pop(0)
    if len(paragraphs) == 1:
        paragraphs = _SENTENCE_END.split(paragraphs[0], maxsplit=1)
    return paragraphs


def train_heldout_split(pairs: Iterable[Pair], heldout_fraction: float = 0.1, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into (train, heldout) by a hash of each pair's text.

    A pair's side depends only on its text and ``seed``, never on its position,
    so the split is the same however the input is ordered or truncated, and a
    pair is held out on every machine. The held-out share is approximately
    ``heldout_fraction``. Input order is kept within each side.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    train: list[Pair] = []
    heldout: list[Pair] = []
    for pair in pairs:
        (heldout if _unit_hash(pair, seed) < heldout_fraction else train).append(pair)
    return train, heldout


def write_jsonl(pairs: Iterable[Pair], path: str | Path, anchor: str = "anchor", positive: str = "positive") -> None:
    """Write one ``{anchor: summary, positive: rest}`` JSON object per line, UTF-8.

    The column names match what a contrastive data loader expects, so the
    file can be fed to training directly.
    """
    with open(path, "w", encoding="utf-8") as f:
        for summary, rest in pairs:
            f.write(json.dumps({anchor: summary, positive: rest}, ensure_ascii=False) + "\n")


def _documented_members() -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of each public member, each object once."""
    seen: set[int] = set()
    for module in _importable_modules():
        for qualname, obj in _module_members(module):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = inspect.getdoc(obj)
            if doc:
                yield f"{module.__name__}.{qualname}", doc


def _importable_modules() -> Iterator[ModuleType]:
    """The modules of ``MODULES`` that import on this interpreter."""
    for name in MODULES:
        module = _try_import(name)
        if module is not None:
            yield module


def _try_import(name: str) -> ModuleType | None:
    """Import ``name``, or None when an optional extension it needs is missing from this build."""
    try:
        return importlib.import_module(name)
    except ImportError:  # e.g. a Python built without _ssl, _lzma or _sqlite3
        return None


def _module_members(module: ModuleType) -> Iterator[tuple[str, object]]:
    """Public functions and classes defined in ``module``, and the public methods of those classes."""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not _defined_in(obj, module):
            continue
        if inspect.isroutine(obj):
            yield name, obj
        elif inspect.isclass(obj):
            yield name, obj
            for method_name, method in _class_methods(obj, module):
                yield f"{name}.{method_name}", method


def _class_methods(cls: type, module: ModuleType) -> Iterator[tuple[str, object]]:
    """Public methods written in ``cls``'s own body (not inherited), unwrapping static/class methods.

    Methods of classes implemented in C carry no ``__module__`` but always
    belong to their class, so they are kept too. Anything else (say an
    ``lru_cache`` wrapper another library patched onto ``logging.Logger``) is
    not the standard library's and is skipped, so the pairs do not depend on
    what else the process has imported.
    """
    for name, attr in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if (inspect.isfunction(attr) and _defined_in(attr, module)) or isinstance(attr, _C_METHODS):
            yield name, attr


def _defined_in(obj: object, module: ModuleType) -> bool:
    """Whether ``obj`` was defined by ``module`` rather than imported into it."""
    return getattr(obj, "__module__", None) == module.__name__


def _one_line(text: str) -> str:
    """Collapse all runs of whitespace to single spaces."""
    return " ".join(text.split())


def _truncate_words(text: str, max_chars: int) -> str:
    """Cut single-spaced ``text`` to at most ``max_chars`` characters, at a word boundary when there is one."""
    if len(text) <= max_chars:
        return text
    space = text.rfind(" ", 0, max_chars + 1)
    return text[:space] if space > 0 else text[:max_chars]


def _unit_hash(pair: Pair, seed: int) -> float:
    """A number in [0, 1) fixed by the pair's text and ``seed``."""
    digest = hashlib.sha256(f"{seed}\x00{pair[0]}\x00{pair[1]}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
