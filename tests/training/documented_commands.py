"""The training commands written in the user guides (docs/sam.md, docs/lm.md), parsed into argument
lists, so tests can check that the committed recipe files say the same."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _words(line: str) -> list[str]:
    """Shell words of one command line; comments dropped, cut at a redirection or control operator."""
    words = shlex.split(line, comments=True)
    for index, word in enumerate(words):
        if word in ("&", "&&", ";", "|", "||") or word.startswith(">") or word[:1].isdigit() and ">" in word:
            return words[:index]
    return words


def shell_blocks(markdown: Path) -> list[list[list[str]]]:
    """The ```bash blocks of ``markdown``, each a list of commands (continuation lines joined) as words;
    a ``for VAR in A B; do ... done`` loop is expanded into one command per value."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", markdown.read_text(), flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        commands, loop = [], None
        for line in lines:
            header = re.match(r"\s*for (\w+) in ([^;]+); do\s*$", line)
            if header:
                loop = (header.group(1), header.group(2).split())
                continue
            if line.strip() == "done":
                loop = None
                continue
            if loop is None:
                commands.append(_words(line))
            else:
                name, values = loop
                commands.extend(_words(line.replace(f"${name}", value).replace(f"${{{name}}}", value)) for value in values)
        blocks.append([words for words in commands if words])
    return blocks


def train_arguments(markdown: Path, group: str) -> list[list[str]]:
    """The arguments after ``linmix GROUP train`` of each such command in ``markdown``."""
    found = []
    for block in shell_blocks(markdown):
        for words in block:
            for index in range(len(words) - 2):
                if words[index].endswith("linmix") and words[index + 1] == group and words[index + 2] == "train":
                    found.append(words[index + 3:])
                    break
    return found


SAM_PHASE_RUNS = "runs/tiny-rwkv"  # the --out folders of the shipped model's phases


def sam_phase_arguments() -> dict[str, list[str]]:
    """``--out`` folder -> arguments of each documented phase command of the shipped RWKV-SAM model
    (wherever under docs/ the phase history lives)."""
    result = {}
    for markdown in sorted((REPO / "docs").rglob("*.md")):
        for arguments in train_arguments(markdown, "sam"):
            if "--out" not in arguments:
                continue
            out = arguments[arguments.index("--out") + 1]
            if out == SAM_PHASE_RUNS or out.startswith(SAM_PHASE_RUNS + "-"):
                assert out not in result, f"two documented commands write {out}"
                result[out] = arguments
    return result


LM_SHAKESPEARE_DATA = "data/shakespeare/train"  # the --data of docs/lm.md's "Training" runs
LM_RECALL_DATA = "data/recall/train"  # the --data of its "Equal-budget recall comparison" runs


def _lm_runs_on(data: str) -> dict[str, list[str]]:
    """Model preset -> arguments of the documented `linmix lm train` runs of docs/lm.md on ``--data data``;
    each model is trained once per data set."""
    result = {}
    for arguments in train_arguments(REPO / "docs" / "lm.md", "lm"):
        if "--model" in arguments and "--data" in arguments and arguments[arguments.index("--data") + 1] == data:
            model = arguments[arguments.index("--model") + 1]
            assert model not in result, f"two documented runs train {model} on {data}"
            result[model] = arguments
    return result


def lm_run_arguments() -> dict[str, list[str]]:
    """Model preset -> arguments of the documented Shakespeare runs of docs/lm.md ("Training")."""
    return _lm_runs_on(LM_SHAKESPEARE_DATA)


def lm_recall_run_arguments() -> dict[str, list[str]]:
    """Model preset -> arguments of the documented runs of docs/lm.md ("Equal-budget recall comparison")."""
    return _lm_runs_on(LM_RECALL_DATA)


def lm_documented_data() -> set[str]:
    """Every --data of a documented `linmix lm train` run with a --model (so a new data set is not missed)."""
    return {arguments[arguments.index("--data") + 1] for arguments in train_arguments(REPO / "docs" / "lm.md", "lm")
            if "--model" in arguments and "--data" in arguments}
