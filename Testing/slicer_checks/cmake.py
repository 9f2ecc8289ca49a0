"""A small reader for the extension's CMakeLists.txt files (enough for set(), file(GLOB...) and macro calls)."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Dict, List, Tuple

_COMMAND = re.compile(r"(?m)^[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*\(")
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s()"]+)')


def _strip_comments(text: str) -> str:
    out = []
    for line in text.splitlines():
        in_quote = False
        for i, ch in enumerate(line):
            if ch == '"':
                in_quote = not in_quote
            elif ch == "#" and not in_quote:
                line = line[:i]
                break
        out.append(line)
    return "\n".join(out)


def commands(text: str) -> List[Tuple[str, List[str]]]:
    """(command name, argument tokens) in file order."""
    text = _strip_comments(text)
    result = []
    pos = 0
    while True:
        m = _COMMAND.search(text, pos)
        if not m:
            break
        depth, i = 1, m.end()
        in_quote = False
        while i < len(text) and depth:
            ch = text[i]
            if ch == '"' and text[i - 1] != "\\":
                in_quote = not in_quote
            elif not in_quote:
                depth += {"(": 1, ")": -1}.get(ch, 0)
            i += 1
        body = text[m.end(): i - 1]
        args = [a[0] if a[0] else a[1] for a in _TOKEN.findall(body)]
        result.append((m.group(1), args))
        pos = i
    return result


class CMakeFile:
    """Evaluates set()/list(APPEND)/file(GLOB[_RECURSE]) and records other calls, with ${VAR} expansion."""

    def __init__(self, path: Path, variables: Dict[str, List[str]] = None):
        self.path = Path(path).resolve()
        self.vars: Dict[str, List[str]] = {
            "CMAKE_CURRENT_SOURCE_DIR": [str(self.path.parent)],
            "CMAKE_SOURCE_DIR": [str(self.path.parent)],
        }
        self.vars.update(variables or {})
        self.calls: List[Tuple[str, List[str]]] = []
        self.globs: List[Tuple[str, str, List[str]]] = []  # (variable, relative-to, patterns)
        for name, args in commands(self.path.read_text(encoding="utf-8")):
            self._run(name.lower(), [self.expand(a) for a in args])

    def expand(self, token: str) -> str:
        def sub(m):
            return ";".join(self.vars.get(m.group(1), []))

        prev = None
        while prev != token:
            prev, token = token, re.sub(r"\$\{([A-Za-z0-9_]+)\}", sub, token)
        return token

    @staticmethod
    def _split(args: List[str]) -> List[str]:
        out = []
        for a in args:
            if ";" in a:
                out.extend(x for x in a.split(";") if x != "")
            else:
                out.append(a)
        return out

    def _run(self, name: str, args: List[str]) -> None:
        if name == "set" and args:
            self.vars[args[0]] = self._split(args[1:])
        elif name == "list" and len(args) >= 2 and args[0] == "APPEND":
            self.vars.setdefault(args[1], []).extend(self._split(args[2:]))
        elif name == "get_filename_component" and len(args) >= 3 and args[2] in ("ABSOLUTE", "REALPATH"):
            self.vars[args[0]] = [os.path.normpath(args[1])]
        elif name == "file" and args and args[0] in ("GLOB", "GLOB_RECURSE"):
            var, rest = args[1], args[2:]
            relative = None
            patterns = []
            i = 0
            while i < len(rest):
                if rest[i] == "RELATIVE":
                    relative = rest[i + 1]
                    i += 2
                    continue
                if rest[i] in ("CONFIGURE_DEPENDS", "FOLLOW_SYMLINKS"):
                    i += 1
                    continue
                patterns.append(rest[i])
                i += 1
            recursive = args[0] == "GLOB_RECURSE"
            files = []
            for pattern in patterns:
                if recursive:
                    directory, fname = os.path.split(pattern)
                    matches = glob.glob(os.path.join(directory, "**", fname), recursive=True)
                else:
                    matches = glob.glob(pattern)
                files.extend(m for m in sorted(matches) if os.path.isfile(m))
            if relative:
                files = [os.path.relpath(f, relative) for f in files]
            self.vars[var] = files
            self.globs.append((var, relative or "", patterns))
        else:
            self.calls.append((name, self._split(args)))

    def call(self, name: str) -> List[List[str]]:
        return [args for n, args in self.calls if n == name.lower()]


def keyword_args(args: List[str], keywords: List[str]) -> Dict[str, List[str]]:
    """Group macro arguments by keyword (cmake_parse_arguments style)."""
    out: Dict[str, List[str]] = {}
    current = None
    for a in args:
        if a in keywords:
            current = a
            out.setdefault(a, [])
        elif current is not None:
            out[current].append(a)
    return out
