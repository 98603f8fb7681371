"""README.md's fenced code blocks, their marks, and the tiny-size rewrite of a command.

A block runs unless the HTML comment right before it marks it: ``<!-- readme-test: skip (reason) -->``
(it cannot run on one CPU machine; the reason is required) or ``<!-- readme-test: output -->``
(sample output or a diagram, nothing to run). tests/test_readme.py holds the tables: the tiny
sizes, the placeholders, what a block is given, which blocks are fast.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

MARK = re.compile(r"<!--\s*readme-test:\s*(?P<kind>[\w-]+)\s*(?:\((?P<reason>.*)\))?\s*-->", re.S)
KINDS = ("skip", "output")
SCRIPT = re.compile(r"^(recipes|bench)/\w+\.py$")


@dataclass(frozen=True)
class Block:
    """One fenced block: ``id`` is its section's slug and its place there (``export-1``)."""

    id: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mark: str = "run"  # "run", "skip" or "output"
    reason: str = ""

    @property
    def where(self) -> str:
        return f"README.md:{self.line} [{self.id}]"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: ``Fine-tuning / robust transfer`` -> ``fine-tuning--robust-transfer``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def read_mark(token, line: int) -> tuple[str, str]:
    """The kind and reason of a ``readme-test`` comment; ``ValueError`` naming the line when malformed."""
    m = MARK.fullmatch(token.content.strip())
    kind, reason = (m["kind"], (m["reason"] or "").strip()) if m else (None, "")
    if kind not in KINDS or (kind == "skip") != bool(reason):
        raise ValueError(f"README.md:{line}: a mark reads <!-- readme-test: skip (why it cannot run here) --> "
                         f"or <!-- readme-test: output -->, got {token.content.strip()!r}")
    return kind, reason


def parse(path: Path) -> list[Block]:
    """Every fenced block of ``path`` in order, with its mark; a stray or malformed mark is a ``ValueError``."""
    tokens = MarkdownIt().parse(Path(path).read_text(encoding="utf-8"))
    blocks, section, seen = [], "top", {}
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            section = slug(tokens[i + 1].content)
        elif tok.type == "html_block" and "readme-test" in tok.content:
            mark = read_mark(tok, tok.map[0] + 1)
            if i + 1 >= len(tokens) or tokens[i + 1].type != "fence":
                raise ValueError(f"README.md:{tok.map[0] + 1}: the mark {mark[0]!r} is not right before a fenced block")
        elif tok.type == "fence":
            prev = tokens[i - 1] if i else None
            kind, reason = ("run", "")
            if prev is not None and prev.type == "html_block" and "readme-test" in prev.content:
                kind, reason = read_mark(prev, prev.map[0] + 1)
            seen[section] = seen.get(section, 0) + 1
            blocks.append(Block(f"{section}-{seen[section]}", tok.map[0] + 1, tok.info.strip(), tok.content,
                                kind, reason))
    return blocks


def commands(text: str) -> list[str]:
    """A shell block's commands: continuation lines joined, blank and comment lines dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    return out + ([cur] if cur.strip() else [])


def console(text: str) -> list[tuple[str, list[str]]]:
    """A transcript block (``$ command`` lines, each followed by its output): ``(command, output lines)``."""
    pairs = []
    for line in text.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        elif pairs and line.strip():
            pairs[-1][1].append(line)
    return pairs


def is_console(block: Block) -> bool:
    return block.lang in ("", "console") and block.text.startswith("$ ")


def script_of(argv: list[str]) -> str | None:
    """The recipe or benchmark a command runs (``recipes/export.py``), or None."""
    return next((a for a in argv if SCRIPT.match(a)), None)


def set_flags(argv: list[str], tiny: dict[str, list[str]]) -> list[str]:
    """``argv`` with every flag of ``tiny`` set to its tiny value(s): a value given is replaced, a
    missing flag is appended. ``{"--epochs": ["1"]}`` turns ``--epochs 5`` into ``--epochs 1``."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in tiny:
            i += 1
            if "=" not in argv[i - 1]:
                while i < len(argv) and not argv[i].startswith("--"):
                    i += 1
            continue
        out.append(argv[i])
        i += 1
    for flag, values in tiny.items():
        out += [flag, *values]
    return out


def substitute(argv: list[str], placeholders: dict[str, str]) -> list[str]:
    """Placeholder arguments (``DATA``, ``runs/std``) replaced by what the test made for them."""
    return [placeholders.get(a, a) for a in argv]


def split(cmd: str) -> list[str]:
    return shlex.split(cmd, comments=True)
