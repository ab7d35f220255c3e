"""The repository speaks about the software only: no absolute paths of the machines it was developed on, and
no references to files that are not in the repository.

Checked in every tracked (and untracked, not ignored) text file:

- absolute machine paths (a workspace, root's or a user's home, the temporary folder) anywhere in documents
  and data (Markdown, YAML, JSON, TOML, text), and in Python comments and docstrings (code may build such
  paths at run time, e.g. through ``tempfile``; prose and recorded results may not);
- Markdown links to relative targets that do not exist;
- repository paths (``sparse_nlp/...``, ``tests/...``, ``benchmarks/...``, ``recipes/...``, ``docs/...``,
  ``model_cards/...``) named anywhere, globs and ``{a,b}`` alternatives included, that match no file
  (a path written after an output option such as ``--out`` names a file the command creates, not one that
  must exist; a path completed by a shell variable, ``recipes/x-$name.yaml``, is not checked);
- upper-case document names (``NAME.md``) that no file in the repository has.
"""

from __future__ import annotations

import ast
import io
import re
import shutil
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()

TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".json", ".toml", ".txt", ".cfg", ".ini", ".cpp", ".sh", ""}
PROSE_SUFFIXES = TEXT_SUFFIXES - {".py"}

# /work/..., /root/..., /tmp/..., /home/<user>/... written as a path (not as part of a longer relative path).
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|tmp)/|(?<![\w.~-])/home/[A-Za-z_][\w.-]*/")
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_DIRS = ("sparse_nlp", "tests", "benchmarks", "recipes", "docs", "model_cards", ".ci")
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:\.\./)*(?:" + "|".join(re.escape(d) for d in REPO_DIRS) + r")/[\w./{},*-]*[\w*}])"
)
OUTPUT_OPTION = re.compile(r"(?:--out|--json|--card-out|--card|--name|-o|>)\s*=?\s*$")
DOC_NAME = re.compile(r"(?<![\w./-])([A-Z][A-Z0-9_-]*\.md)\b")


def _repo_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = [ROOT / name for name in out.split("\0") if name]
    return [p for p in files if p.is_file()]


def _text(path: Path) -> str | None:
    if path.suffix not in TEXT_SUFFIXES:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _python_prose(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python source."""
    out = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                out.append((first.lineno, first.value.value))
    return out


def _checked_files() -> list[tuple[Path, str]]:
    files = []
    for path in _repo_files():
        if path.resolve() == SELF:
            continue  # its own patterns
        text = _text(path)
        if text is not None:
            files.append((path, text))
    return files


def _expand(pattern: str) -> list[str]:
    """``a.{json,png}`` -> ``a.json``, ``a.png``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [
        expanded
        for alt in match.group(1).split(",")
        for expanded in _expand(pattern[: match.start()] + alt + pattern[match.end() :])
    ]


def _exists(ref: str, base: Path) -> bool:
    ref = ref.split("::")[0].split("#")[0].rstrip(".,;:")
    if not ref:
        return True
    for candidate in _expand(ref):
        for folder in (base, ROOT):
            if (
                any(True for _ in folder.glob(candidate))
                if "*" in candidate
                else (folder / candidate).exists()
            ):
                break
        else:
            return False
    return True


def _missing_repo_paths(line: str, base: Path) -> list[str]:
    """Repository paths named in `line` that match no file (outputs of a command and names completed by a
    shell variable or a placeholder are not checked)."""
    missing = []
    for match in REPO_PATH.finditer(line):
        rest = line[match.end() :]
        rest = rest[re.match(r"[\w./-]*", rest).end() :]
        if OUTPUT_OPTION.search(line[: match.start()]) or rest[:1] in ("$", "<"):
            continue
        if not _exists(match.group(1), base):
            missing.append(match.group(1))
    return missing


def test_no_stray_files_named_like_options():
    """A file named like a command-line option (e.g. `--help`) is the output of a command that took the option as
    a path; it does not belong in the repository."""
    stray = [str(p.relative_to(ROOT)) for p in _repo_files() if p.name.startswith("-")]
    assert not stray, f"files named like command-line options: {stray}"


def test_no_absolute_machine_paths():
    hits = []
    for path, text in _checked_files():
        rel = path.relative_to(ROOT)
        if path.suffix == ".py":
            chunks = _python_prose(text)
        elif path.suffix in PROSE_SUFFIXES:
            chunks = [(1, text)]
        else:
            continue
        for first_line, chunk in chunks:
            for match in MACHINE_PATH.finditer(chunk):
                line = first_line + chunk.count("\n", 0, match.start())
                hits.append(f"{rel}:{line}: {match.group(0)!r}")
    assert not hits, "absolute machine paths (write a relative path, or leave the field out):\n" + "\n".join(
        hits
    )


def test_no_references_to_missing_files():
    names = {path.name for path, _ in _checked_files()} | {p.name for p in _repo_files()}
    hits = []
    for path, text in _checked_files():
        rel = path.relative_to(ROOT)
        for number, line in enumerate(text.splitlines(), 1):
            if path.suffix == ".md":
                for target in MARKDOWN_LINK.findall(line):
                    if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                        continue  # a URL or an anchor
                    if not _exists(target, path.parent):
                        hits.append(f"{rel}:{number}: link to {target!r}")
            if path.name != ".gitignore":  # ignore patterns, not references
                hits += [f"{rel}:{number}: {ref!r}" for ref in _missing_repo_paths(line, path.parent)]
            for name in DOC_NAME.findall(line):
                if name not in names:
                    hits.append(f"{rel}:{number}: {name!r}")
    assert not hits, "references to files that are not in the repository:\n" + "\n".join(hits)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The patterns above do find what they are meant to find (so an empty result means something)."""
    assert MACHINE_PATH.search("see /" + "work/runs/x") and MACHINE_PATH.search("/" + "home/alice/data")
    assert MACHINE_PATH.search('"out": "/' + 'tmp/dense"') and MACHINE_PATH.search("/" + "root/.cache")
    assert not MACHINE_PATH.search("runs/work/x") and not MACHINE_PATH.search("../shared/data")
    assert DOC_NAME.findall("as DESIGN" + ".md says") == ["DESIGN" + ".md"]
    assert REPO_PATH.search("see `recipes/nothing-here.yaml`").group(1) == "recipes/nothing-here.yaml"
    assert not _exists("recipes/nothing-here.yaml", ROOT)
    assert _exists("recipes/*.yaml", ROOT) and _exists("tests/test_repo_hygiene.py::test_x", ROOT)
    assert _exists("benchmarks/results/training_sparsity.{json,png}", ROOT)
    source = '"""Doc /' + 'work/a."""\nX = "/' + 'tmp/ok"  # comment /' + "root/b\n"
    prose = " ".join(text for _, text in _python_prose(source))
    assert "/" + "work/a" in prose and "/" + "root/b" in prose and "/" + "tmp/ok" not in prose
