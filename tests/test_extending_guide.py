"""docs/extending.md, executed (issue 27): in a copy of the repository, every file block of the guide is written as a
new file and every command block is run; the new preset and the new learner then pass the suite's registry-derived
checks, and the only tracked files that changed are the generated ones.

The copy is the working tree as git sees it (tracked files and untracked ones that are not ignored), committed in a
fresh repository so that ``git status`` shows exactly what the guide's steps touched. About two minutes on 2 cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "extending.md"
#: what the guide's commands regenerate: README's key tables, the ledger and its docs, the golden pins
GENERATED = {"README.md", "exps/ledger.json", "docs/results.md", "tests/golden/presets.json"}


def guide_steps(text: str) -> tuple[dict[str, str], list[str]]:
    """The guide's file blocks (path -> content) and the lines of its command blocks, in order.

    Raises:
        AssertionError: a marker without a fenced block after it.
    """
    files, commands = {}, []
    blocks = list(re.finditer(r"^<!-- (file: (\S+)|run) -->\n```\w*\n(.*?)```", text, flags=re.S | re.M))
    assert len(blocks) == len(re.findall(r"^<!-- (?:file: \S+|run) -->", text,
                                         flags=re.M)), "a marker without its block"
    for match in blocks:
        if match.group(2):
            files[match.group(2)] = match.group(3)
        else:
            commands += [line for line in match.group(3).splitlines() if line.strip()]
    return files, commands


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=guide", "-c", "user.email=guide@example.org", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked + untracked, not ignored), in a new repository with one commit."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "copy")


def test_the_guide_has_one_new_file_per_extension_and_its_commands():
    files, commands = guide_steps(GUIDE.read_text(encoding="utf-8"))
    assert {"models/sparse/topk_magnitude.py", "models/linear_probe.py", "models/sparse/snr.py"} <= set(files)
    assert not [f for f in files if (REPO / f).exists()], "the guide's files must be new"
    assert any("--write-readme" in c for c in commands) and any("ledger --add" in c for c in commands)


def test_the_guides_preset_and_learner_need_no_other_file(tmp_path):
    files, commands = guide_steps(GUIDE.read_text(encoding="utf-8"))
    root = tmp_path / "repo"
    copy_tree(root)
    for rel, content in files.items():
        assert not (root / rel).exists(), f"{rel} exists already: the guide's files must be new"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    status = git(root, "status", "--porcelain", "--untracked-files=all").splitlines()
    changed = {line[3:] for line in status if not line.startswith("??")}
    new = {line[3:] for line in status if line.startswith("??")}
    assert changed <= GENERATED, f"the guide's steps changed files it does not name: {sorted(changed - GENERATED)}"
    assert new == set(files), sorted(new ^ set(files))
    readme = (root / "README.md").read_text()
    assert "`topk_budget`" in readme and "`probe_steps`" in readme
    pins = (root / "tests/golden/presets.json").read_text()
    assert '"ranpac/topk_magnitude"' in pins and '"linear_probe/mist"' in pins
