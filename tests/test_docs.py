"""The docs' code runs as written: every ```python block of README.md and docs/*.md, each in a
fresh process in a temporary folder, on the embedded tiny model instead of the hub models the
pages name. The processes are forked from one that has imported trainer_lib already
(tests/scripts/warm_python.py), so the imports are paid once.

Conventions the pages follow (HTML comments, invisible when rendered):
- `<!-- file: NAME -->` before a block: the block is a file the page's other blocks use (a
  module, a YAML config); it is written under NAME beside every block of that page. A Python
  file block is also run.
- `<!-- not run: REASON -->` before a Python block: the block is not run (a Ctrl-C, a launch on
  several GPUs); the reason is required.
- A ```text block right after a Python block is what it prints: each of its lines must appear
  in the output, in order, with `...` matching anything. A block that calls print() must show
  its output so.

Besides the blocks: relative links between the pages resolve, and every package path the pages
name exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Models the test machine cannot download; the blocks run on the embedded tiny model instead
PLACEHOLDERS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M",
                "path/or/hub-id", "path/to/base", "path/to/sft_model")
PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))
MARKER = re.compile(r"<!--\s*(file|not run):\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")
TIMEOUT = 120


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    file: str | None = None  # <!-- file: NAME -->
    not_run: str | None = None  # <!-- not run: REASON -->
    output: str | None = None  # the ```text block that follows

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def parse(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    previous = ""  # the last non-blank line before the current one
    closed_python = None  # the Python block whose closing fence is `previous`
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            if lines[i].strip():
                previous, closed_python = lines[i], None
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page.name}:{i + 1}: a code block is never closed"
        code = "\n".join(lines[i + 1:end]) + "\n"
        lang = fence.group(1)
        if lang == "text" and closed_python is not None:
            closed_python.output = code
            closed_python = None
        else:
            block = Block(page, i + 1, lang, code)
            marker = MARKER.fullmatch(previous.strip())
            if marker:
                setattr(block, "file" if marker.group(1) == "file" else "not_run", marker.group(2))
            blocks.append(block)
            closed_python = block if lang == "python" else None
        previous = lines[end]
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in parse(page)]
RUN = [b for b in BLOCKS if b.lang == "python" and b.not_run is None]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from trainer_lib.model.embedded import tiny_model

    return tiny_model(tmp_path_factory.mktemp("embedded") / "tiny-llama")


def substitute(code: str, model: str) -> str:
    return PLACEHOLDER.sub(model, code)


def expected_lines(output: str) -> list[re.Pattern]:
    return [re.compile(".*".join(re.escape(part) for part in line.rstrip().split("...")))
            for line in output.splitlines() if line.strip()]


def check_output(expected: str, printed: str) -> None:
    """Every expected line matches a printed line, in order."""
    printed_lines = [line.rstrip() for line in printed.splitlines()]
    at = 0
    for pattern in expected_lines(expected):
        while at < len(printed_lines) and not pattern.fullmatch(printed_lines[at]):
            at += 1
        assert at < len(printed_lines), (
            f"the page shows a line that the block did not print (in this order):\n"
            f"  {pattern.pattern}\nprinted:\n{printed[-4000:]}")
        at += 1


@pytest.fixture(scope="module")
def python():
    """Runs a script as `python SCRIPT` in a folder, with more environment: (returncode, stdout,
    stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
               os.pathsep)}
    warm = subprocess.Popen([sys.executable, str(REPO / "tests" / "scripts" / "warm_python.py")],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(script: Path, cwd: Path, more_env: dict) -> tuple[int, str, str]:
        out, err = cwd.parent / "stdout.txt", cwd.parent / "stderr.txt"
        warm.stdin.write(json.dumps({"script": str(script), "cwd": str(cwd), "env": more_env,
                                     "timeout": TIMEOUT, "stdout": str(out),
                                     "stderr": str(err)}) + "\n")
        warm.stdin.flush()
        answer = warm.stdout.readline()
        assert answer, "the process that runs the blocks has died"
        return (json.loads(answer)["returncode"], out.read_text(encoding="utf-8", errors="replace"),
                err.read_text(encoding="utf-8", errors="replace"))

    yield run
    warm.stdin.close()
    warm.wait(timeout=30)


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_block_runs(block: Block, model_dir, python, tmp_path):
    if "print(" in block.code:
        assert block.output is not None, (
            f"{block.id} prints, but the page does not show what (a ```text block right after it)")
    work = tmp_path / "work"
    work.mkdir()
    for other in BLOCKS:  # the page's files, beside the block
        if other.page == block.page and other.file:
            (work / other.file).write_text(substitute(other.code, model_dir), encoding="utf-8")
    script = work / (block.file or "snippet.py")
    script.write_text(substitute(block.code, model_dir), encoding="utf-8")
    returncode, stdout, stderr = python(script, work, {
        "TRAINER_LIB_CACHE": str(tmp_path / "cache"),
        "TRAINER_LIB_DATA_CACHE": str(tmp_path / "data-cache")})
    assert returncode == 0, (f"{block.id} exited with {returncode}\n"
                             f"{stdout[-3000:]}\n{stderr[-3000:]}")
    if block.output is not None:
        check_output(block.output, stdout)


def test_blocks_not_run_say_why():
    for block in BLOCKS:
        if block.not_run is not None:
            assert block.not_run.strip(), f"{block.id}: <!-- not run: REASON --> needs a reason"
            assert block.lang == "python", f"{block.id}: only Python blocks are run at all"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces
    to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, in_code = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(github_anchor(line.lstrip("#")))
    return found


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


PACKAGE_PATH = re.compile(r"`(trainer_lib/[\w/.\-]+)`")


def tree_paths(block: Block) -> list[str]:
    """The paths of a package tree drawn as `trainer_lib/` and names indented two spaces a level."""
    paths, folders = [], []
    for line in block.code.splitlines():
        if not line.strip():
            continue
        level = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        del folders[level:]
        paths.append("/".join([*folders, name]))
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
    return paths


def test_package_paths_the_pages_name_exist():
    named = [(page, path) for page in PAGES
             for path in PACKAGE_PATH.findall(page.read_text(encoding="utf-8"))]
    named += [(b.page, path) for b in BLOCKS if b.lang == "" and b.code.startswith("trainer_lib/")
              for path in tree_paths(b)]
    assert len(named) > 50  # the architecture page's tree among them
    missing = [f"{page.relative_to(REPO)}: {path}" for page, path in named
               if not (REPO / path).exists()]
    assert not missing, "\n".join(missing)
