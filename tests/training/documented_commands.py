"""The training commands written in the user guides (docs/sam.md, docs/lm.md), parsed into argument
lists, so tests can check that the committed recipe files say the same."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def shell_commands(markdown: Path) -> list[list[str]]:
    """Every command of the ```bash blocks of ``markdown``, continuation lines joined, as shell words
    (comments dropped, a command ends at a redirection or a control operator)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown.read_text(), flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            for index, word in enumerate(words):
                if word in (">", ">>", "&", "&&", ";", "|", "2>&1") or word.startswith(">"):
                    words = words[:index]
                    break
            if words:
                commands.append(words)
    return commands


def train_arguments(markdown: Path, group: str) -> list[list[str]]:
    """The arguments after ``linmix GROUP train`` of each such command in ``markdown``."""
    found = []
    for words in shell_commands(markdown):
        for index in range(len(words) - 2):
            if words[index].endswith("linmix") and words[index + 1] == group and words[index + 2] == "train":
                found.append(words[index + 3:])
                break
    return found


def sam_phase_arguments() -> dict[str, list[str]]:
    """``--out`` folder -> arguments of each documented `linmix sam train` phase command."""
    result = {}
    for arguments in train_arguments(REPO / "docs" / "sam.md", "sam"):
        out = arguments[arguments.index("--out") + 1]
        assert out not in result, f"two documented commands write {out}"
        result[out] = arguments
    return result


def lm_run_arguments() -> dict[str, list[str]]:
    """Model preset -> arguments of the documented `linmix lm train` run of docs/lm.md (its loop over
    ``m`` expanded)."""
    result = {}
    markdown = REPO / "docs" / "lm.md"
    loop = re.search(r"for m in ([^;]+); do", markdown.read_text())
    models = loop.group(1).split() if loop else []
    for arguments in train_arguments(markdown, "lm"):
        if any("$m" in word for word in arguments):
            for model in models:
                result[model] = [word.replace("$m", model) for word in arguments]
    return result
