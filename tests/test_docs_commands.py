"""What a user copies from README.md and docs/ after `make demo` works as written: the shell first
gets the environment (`source .venv/bin/activate`), every `bnonly` command parses and its config
loads, the launchers start without the project installed, and every internal link resolves."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bnonly_dist import cli, config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ACTIVATE = "source .venv/bin/activate"
PLACEHOLDER = re.compile(r"\.\.\.|\$|\b(CONFIG|RUN|DIR|WHEELS|OUT)\b")


def _shell_lines(doc: Path) -> list[str]:
    """The command lines of a document's bash blocks, continuations joined, comments removed."""
    lines, pending = [], ""
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", doc.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = pending + line if pending else line.split(" # ")[0].strip()
            if not line or line.startswith("#"):
                continue
            try:
                shlex.split(line)
            except ValueError:  # a quote that spans lines (python -c "..."): one command with the next line
                pending = line + "\n"
                continue
            pending = ""
            lines.append(line)
    return lines


def _bnonly_args(line: str) -> list[str] | None:
    """The arguments a line gives `bnonly` (also through torchrun -m bnonly_dist.cli or srun), else None."""
    words = shlex.split(line)
    for marker in ("bnonly", "bnonly_dist.cli"):
        if marker in words:
            return words[words.index(marker) + 1:]
    return None


def test_the_readme_gets_the_environment_before_its_first_installed_command():
    lines = _shell_lines(REPO / "README.md")
    first_tool = next(i for i, line in enumerate(lines) if re.match(r"(bnonly|python|torchrun|tensorboard|srun) ", line))
    assert ACTIVATE in lines[:first_tool], lines[:first_tool + 1]
    # --no-print-directory: under `make test` (MAKELEVEL set) a sub-make would end with "Leaving directory"
    demo = subprocess.run(["make", "--no-print-directory", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
    assert demo.returncode == 0 and ACTIVATE in demo.stdout.splitlines()[-1]  # make demo says it at its end


def test_the_readme_shows_the_lines_make_demo_ends_with():
    ending = re.search(r"`make demo` writes.*?ends with (.*?)\n\n```\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert ending and ending.group(1).startswith("two lines"), "README: say what make demo ends with"
    shown = ending.group(2).splitlines()
    demo = subprocess.run(["make", "--no-print-directory", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
    last = shlex.split(demo.stdout.splitlines()[-1])  # echo "next: ...": the line make demo prints last
    assert last[0] == "echo" and len(shown) == 2 and shown[0].startswith("done: top1 ") and shown[1] == last[1]


def test_every_bnonly_command_in_the_docs_parses_and_its_config_loads(monkeypatch):
    monkeypatch.chdir(REPO)
    checked = 0
    for doc in DOCS:
        for line in _shell_lines(doc):
            args = _bnonly_args(line)
            if args is None or PLACEHOLDER.search(line):
                continue
            try:
                parsed = config.parse_args(cli.parser(), args)
            except SystemExit:
                pytest.fail(f"{doc.name}: `{line}` does not parse")
            if parsed.func in (cli._train, cli._bench, cli._bench_checkpoint):
                config.load(parsed.config, parsed.overrides)  # ConfigError names the stale key
            checked += 1
    assert checked >= 15


def test_the_launchers_start_without_the_project_installed(tmp_path):
    """`python launchers/X.py` from a Python that has the dependencies but not this project, anywhere."""
    launchers = sorted({word for doc in DOCS for line in _shell_lines(doc) for word in shlex.split(line)
                        if re.fullmatch(r"launchers/\w+\.py", word)})
    assert launchers == ["launchers/submit.py", "launchers/sweep.py"]
    for launcher in launchers:
        code = ("import importlib.util, os, runpy, sys\n"
                "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
                "sys.path = [p for p in sys.path if p and '__editable__' not in p and not os.path.isdir(p + '/bnonly_dist')]\n"
                "assert importlib.util.find_spec('bnonly_dist') is None, 'the project is importable anyway'\n"
                f"sys.argv = [{str(REPO / launcher)!r}, '--help']\n"
                f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_a_fresh_shell_reaches_the_tools_after_activating():
    """The README's line in a shell without the venv on PATH (the clone's .venv: what `make` creates)."""
    if not (REPO / ".venv" / "bin" / "activate").is_file():
        pytest.skip("no .venv in this clone (make demo or make test creates it)")
    script = (f"{ACTIVATE} && bnonly --help >/dev/null && bnonly data --help >/dev/null && python -c 'import bnonly_dist' "
              "&& tensorboard --version_tb >/dev/null && command -v torchrun >/dev/null")
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert out.returncode == 0, out.stderr[-2000:]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces to -; repeats get -1, -2."""
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        count = seen.get(slug, 0)
        out.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return out


def test_github_anchors_follow_its_rule():
    text = "# Two commands\n## What a failure costs (`train.checkpoint_every`)\n## Two commands\n"
    assert _anchors(text) == {"two-commands", "what-a-failure-costs-traincheckpoint_every", "two-commands-1"}


def test_every_internal_link_and_anchor_in_the_docs_resolves():
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken
