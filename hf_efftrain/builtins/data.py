"""Built-in datasets made on this machine, so a first run needs no hub (docs/ARCHITECTURE.md, "Offline built-ins").

- ``stdlib-docs``: real English text, the installed Python's standard-library docstrings read from the source
  files with ``ast`` (importing every stdlib module has side effects), grouped into documents of widely varied
  length (sequence packing, arXiv 2302.01107 sec. "Data efficiency", is measured on it).
- ``sft-synthetic``: seeded instruction/response pairs from small learnable task templates.
- ``chat-synthetic``: seeded multi-turn conversations (a ``messages`` column of ``{role, content}`` turns): an
  optional system prompt (one asks for capital letters), then 1-4 user/assistant turns of the same tasks; some turns
  ask about the previous answer, so the history matters.
- ``cls-synthetic``: a seeded text-classification set with class-indicative words, filler and label noise.

Each is built once, saved with ``save_to_disk`` under ``cache_dir("data-v2", name)`` and memory-mapped after.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import hashlib
import logging
import math
import os
import random
import re
import sysconfig
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets

from ..cache import cache_dir, cached_dir
from ..errors import RecipeError

logger = logging.getLogger(__name__)

PREFIX = "builtin:"  # how a recipe names a built-in: builtin:<name>
BUILTIN_DATASETS: tuple[str, ...] = (
    "stdlib-docs", "sft-synthetic", "chat-synthetic", "cls-synthetic", "pref-synthetic", "pref-pointwise"
)  # fmt: skip

SEED = 1234
VALIDATION_PERMILLE = 50  # ~5% of rows, chosen by a stable hash of the row's text
MIN_DOC_WORDS = 8  # shorter docstrings are mostly "Return x." stubs
DOC_WORDS_RANGE = (20, 600)  # target words per document, drawn log-uniformly so lengths vary widely
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}

_WORD = re.compile(r"^[a-z]{3,10}$")


# ----------------------------------------------------------------------------------------------- helpers


def _is_validation(key: str) -> bool:
    """Stable (not ``hash()``-salted) split: the same row lands in the same split on every machine and run."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % 1000 < VALIDATION_PERMILLE


def _split(rows: list[dict], key: str, features: datasets.Features | None = None) -> datasets.DatasetDict:
    train = [r for r in rows if not _is_validation(str(r[key]))]
    val = [r for r in rows if _is_validation(str(r[key]))]

    def to_ds(part: list[dict]) -> datasets.Dataset:
        columns = {c: [r[c] for r in part] for c in rows[0]}
        return datasets.Dataset.from_dict(columns, features=features)

    return datasets.DatasetDict({"train": to_ds(train), "validation": to_ds(val)})


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``save_to_disk`` draws a progress bar on stderr; a library call should print nothing."""
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------- stdlib-docs


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Parsing allocates millions of acyclic AST nodes; with torch loaded, the collector passes they trigger
    over the large heap cost ~3x the parse itself. Reference counting frees the trees anyway."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _stdlib_files(root: Path) -> list[Path]:
    """The stdlib's .py files in sorted order, without site-packages and the test suites."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # sorted in place so os.walk descends in a fixed order
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return files


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Module, class and function docstrings in source order (``ast.walk`` is breadth-first)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]  # clean=True is inspect.cleandoc
        if doc:
            yield doc
        children = [n for n in node.body if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        stack.extend(reversed(children))


def _group(module: str, docs: list[str]) -> list[str]:
    """Join a module's consecutive docstrings into documents whose target lengths come from a seeded RNG."""
    rng = random.Random(f"{SEED}:{module}")  # str seeds are hashed with sha512: stable across runs
    lo, hi = (math.log(x) for x in DOC_WORDS_RANGE)
    out: list[str] = []
    current: list[str] = []
    words, target = 0, round(math.exp(rng.uniform(lo, hi)))
    for doc in docs:
        current.append(doc)
        words += len(doc.split())
        if words >= target:
            out.append("\n\n".join(current))
            current, words, target = [], 0, round(math.exp(rng.uniform(lo, hi)))
    if current:
        out.append("\n\n".join(current))
    return out


def stdlib_documents(root: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Rows ``{"text", "source"}`` from the stdlib docstrings under ``root`` (default: this Python's stdlib)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    seen: set[bytes] = set()
    rows: list[dict[str, str]] = []
    n_files = n_failed = 0
    for path in _stdlib_files(root):
        try:
            with warnings.catch_warnings(), _no_gc():  # invalid escape sequences in old sources warn on stderr
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError, RecursionError):
            n_failed += 1
            continue
        n_files += 1
        docs = []
        for doc in _docstrings(tree):
            normalised = " ".join(doc.split())
            if len(normalised.split()) < MIN_DOC_WORDS:
                continue
            digest = hashlib.sha1(normalised.encode("utf-8")).digest()
            if digest in seen:  # e.g. the same docstring on a C-accelerated and a pure-Python twin
                continue
            seen.add(digest)
            docs.append(doc)
        module = _module_name(path, root)
        rows.extend({"text": text, "source": module} for text in _group(module, docs))
    if not rows:  # e.g. a Python installed without its .py sources
        raise RecipeError("", f"builtin:stdlib-docs needs the standard library's .py sources; none found under {root}")
    logger.info("stdlib-docs: %d documents from %d files (%d did not parse)", len(rows), n_files, n_failed)
    return rows


def _build_stdlib_docs() -> datasets.DatasetDict:
    return _split(stdlib_documents(), "text")


def vocabulary(size: int = 2000) -> list[str]:
    """The ``size`` most frequent plain lower-case words of stdlib-docs (train split), most frequent first."""
    counts: Counter[str] = Counter()
    for text in load_builtin_dataset("stdlib-docs")["train"]["text"]:
        counts.update(w for w in (t.strip(".,;:!?()\"'`").lower() for t in text.split()) if _WORD.match(w))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


# ----------------------------------------------------------------------------------------- sft-synthetic

SFT_ROWS = 4000


def _words(rng: random.Random, vocab: list[str], lo: int, hi: int) -> list[str]:
    return rng.sample(vocab, rng.randint(lo, hi))


def _sft_example(rng: random.Random, vocab: list[str]) -> tuple[str, str]:
    task = rng.randrange(6)
    if task == 0:
        w = _words(rng, vocab, 3, 7)
        head = rng.choice(["Reverse the words", "Write these words in reverse order"])
        return f"{head}: {' '.join(w)}", " ".join(reversed(w))
    if task == 1:
        nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
        return f"Sort these numbers: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))
    if task == 2:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return f"{rng.choice(['Add', 'What is the sum of'])} {a} and {b}.", str(a + b)
    if task == 3:
        w = _words(rng, vocab, 2, 6)
        return f"Uppercase: {' '.join(w)}", " ".join(w).upper()
    if task == 4:
        w = _words(rng, vocab, 1, 12)
        return f"How many words are in: {' '.join(w)}", str(len(w))
    w = _words(rng, vocab, 2, 8)
    return f"Repeat the last word: {' '.join(w)}", w[-1]


def _build_sft_synthetic() -> datasets.DatasetDict:
    rng, vocab = random.Random(SEED), vocabulary()
    rows: dict[str, str] = {}
    while len(rows) < SFT_ROWS:  # unique prompts, so no prompt is in both splits
        prompt, response = _sft_example(rng, vocab)
        rows.setdefault(prompt, response)
    return _split([{"prompt": p, "response": r} for p, r in rows.items()], "prompt")


# ---------------------------------------------------------------------------------------- chat-synthetic

CHAT_ROWS = 4000
CHAT_TURNS = (1, 4)  # user/assistant exchanges per conversation
FOLLOW_UP_RATE = 0.3  # chance that a later user turn asks about the previous answer
CHAT_SYSTEMS: tuple[tuple[str | None, Callable[[str], str]], ...] = (  # system prompt, what it does to answers
    (None, str),
    ("You are a helpful assistant.", str),
    ("You are a helpful assistant. Answer in capital letters.", str.upper),
)
CHAT_FOLLOW_UPS: dict[str, Callable[[str], str]] = {
    "Repeat your last answer.": str,
    "Now reverse the words of your last answer.": lambda a: " ".join(reversed(a.split())),
}


def chat_example(rng: random.Random, vocab: list[str]) -> list[dict[str, str]]:
    """One conversation: its answers follow from the user turns, the system prompt and the previous answer."""
    system, style = rng.choice(CHAT_SYSTEMS)
    messages = [{"role": "system", "content": system}] if system else []
    answer = None
    for _ in range(rng.randint(*CHAT_TURNS)):
        if answer is not None and rng.random() < FOLLOW_UP_RATE:
            prompt = rng.choice(sorted(CHAT_FOLLOW_UPS))
            answer = CHAT_FOLLOW_UPS[prompt](answer)
        else:
            prompt, answer = _sft_example(rng, vocab)
        answer = style(answer)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return messages


def _build_chat_synthetic() -> datasets.DatasetDict:
    rng, vocab = random.Random(SEED), vocabulary()
    rows: dict[str, list[dict[str, str]]] = {}
    while len(rows) < CHAT_ROWS:  # unique conversations, so none is in both splits
        messages = chat_example(rng, vocab)
        rows.setdefault(str(messages), messages)
    turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features({"messages": datasets.List(turn)})
    return _split([{"messages": m} for m in rows.values()], "messages", features)


# ----------------------------------------------------------------------------------------- cls-synthetic

CLS_ROWS = 4000
CLS_LABEL_NOISE = 0.03
CLS_MISLEADING = 0.1  # chance that an indicative word comes from another class
CLS_CLASSES: dict[str, tuple[str, ...]] = {
    "files": ("file", "directory", "path", "folder", "disk", "filename", "archive", "read", "write", "open",
              "close", "stream", "buffer", "mode", "permission", "symlink", "zip", "tar", "glob", "seek"),
    "network": ("socket", "host", "port", "server", "client", "request", "response", "connection", "address",
                "protocol", "http", "url", "proxy", "header", "mail", "packet", "timeout", "ssl", "send", "receive"),
    "numbers": ("integer", "float", "decimal", "fraction", "sum", "product", "digit", "round", "zero", "negative",
                "positive", "division", "modulo", "exponent", "square", "root", "random", "mean", "median", "sign"),
    "text": ("string", "character", "unicode", "encoding", "word", "line", "format", "regex", "pattern", "match",
             "substring", "whitespace", "lowercase", "uppercase", "prefix", "suffix", "quote", "escape", "text",
             "locale"),
}  # fmt: skip


def cls_indicative_words() -> dict[str, tuple[str, ...]]:
    """The words that carry each class's signal (tests use them to check the set is learnable, not trivial)."""
    return dict(CLS_CLASSES)


def _build_cls_synthetic() -> datasets.DatasetDict:
    rng = random.Random(SEED)
    names = list(CLS_CLASSES)
    indicative = {w for ws in CLS_CLASSES.values() for w in ws}
    filler = [w for w in vocabulary() if w not in indicative]
    rows: dict[str, int] = {}
    while len(rows) < CLS_ROWS:
        label = rng.randrange(len(names))
        words = _words(rng, filler, 4, 12)
        others = [i for i in range(len(names)) if i != label]
        for _ in range(rng.randint(2, 4)):
            source = label if rng.random() >= CLS_MISLEADING else rng.choice(others)
            words.insert(rng.randint(0, len(words)), rng.choice(CLS_CLASSES[names[source]]))
        if rng.random() < CLS_LABEL_NOISE:
            label = rng.randrange(len(names))
        text = " ".join(words).capitalize() + "."
        rows.setdefault(text, label)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return _split([{"text": t, "label": y} for t, y in rows.items()], "text", features)


# ---------------------------------------------------------------------------------------- pref-synthetic

PREF_ROWS = 4000


def worse_answer(rng: random.Random, answer: str) -> str:
    """A wrong answer of the same kind: a number off by 1-9, the words out of order, a word misspelt."""
    if answer.lstrip("-").isdigit():
        return str(int(answer) + rng.choice((-1, 1)) * rng.randint(1, 9))
    words = answer.split()
    if len(set(words)) > 1:
        while (shuffled := rng.sample(words, len(words))) == words:
            pass
        return " ".join(shuffled)
    return answer[::-1] if answer[::-1] != answer else answer + answer[-1]


def _build_pref_synthetic() -> datasets.DatasetDict:
    """sft-synthetic's tasks as preference pairs (TRL's prompt / chosen / rejected): the right answer is chosen."""
    rng, vocab = random.Random(SEED), vocabulary()
    rows: dict[str, tuple[str, str]] = {}
    while len(rows) < PREF_ROWS:  # unique prompts, so no prompt is in both splits
        prompt, answer = _sft_example(rng, vocab)
        rows.setdefault(prompt, (answer, worse_answer(rng, answer)))
    return _split([{"prompt": p, "chosen": c, "rejected": r} for p, (c, r) in rows.items()], "prompt")


def _build_pref_pointwise() -> datasets.DatasetDict:
    """pref-synthetic's answers one per row (text: prompt and answer; label 1 chosen, 0 rejected), in its splits: what
    the stock Trainer learns a scorer from without a pairwise loss (the reward_model benchmark's baseline)."""
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["0", "1"])})
    pairs = _build_pref_synthetic()

    def pointwise(split: datasets.Dataset) -> datasets.Dataset:
        rows = [{"text": f"{r['prompt']}\n{r[side]}", "label": int(side == "chosen")}
                for r in split for side in ("chosen", "rejected")]  # fmt: skip
        return datasets.Dataset.from_list(rows, features=features)

    return datasets.DatasetDict({name: pointwise(split) for name, split in pairs.items()})


# ---------------------------------------------------------------------------------------------- loading

_BUILDERS: dict[str, Callable[[], datasets.DatasetDict]] = {
    "stdlib-docs": _build_stdlib_docs,
    "sft-synthetic": _build_sft_synthetic,
    "chat-synthetic": _build_chat_synthetic,
    "cls-synthetic": _build_cls_synthetic,
    "pref-synthetic": _build_pref_synthetic,
    "pref-pointwise": _build_pref_pointwise,
}


def load_builtin_dataset(name: str, path: str = "data.train") -> datasets.DatasetDict:
    """A built-in dataset (``train`` and ``validation`` splits), built on first use and cached on disk.

    ``name`` may carry the ``builtin:`` prefix; ``path`` is the recipe field named in the error for an unknown name.
    """
    key = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if key not in _BUILDERS:
        allowed = ", ".join(PREFIX + n for n in BUILTIN_DATASETS)
        raise RecipeError(path, f"unknown builtin dataset '{key}'; allowed: {allowed}")

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        dataset = _BUILDERS[key]()
        with _quiet_datasets():
            dataset.save_to_disk(str(tmp))
        logger.info("built builtin:%s in %.1fs (%s)", key, time.perf_counter() - start, dataset.num_rows)

    folder = cached_dir(cache_dir("data-v2", key), build)
    with _quiet_datasets():
        # in memory (a few MB): later `.map` calls then do not write cache files into our cache folder
        return datasets.load_from_disk(str(folder), keep_in_memory=True)
