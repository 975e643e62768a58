"""A seeded generator of recall-intensive training and evaluation text, in the spirit of SWDE / FDA.

Each document holds records (people or products) with several attribute-value pairs, laid out as
prose, a key-value list or a table (one layout per document), padded with filler notes that carry
no values, and followed by questions whose answers appear earlier in the same document::

    Personnel records, sheet 48

    Name: Dorava Quentimor
    Hometown: Brelaford
    Date of birth: 14 March 1987
    ...

    Q: Where is Dorava Quentimor from?
    A: Brelaford

Values come from large vocabularies built combinatorially (syllable-composed names, cities and
companies; 7-digit numbers; random product codes; prices; dates over two centuries), so a model
can only answer by copying from the context, not from memory. The vocabularies are split
disjointly by a hash of each value: training documents draw from one part, held-out documents
from the other, and on top of that every training document (and every passage of mixed-in plain
text) is checked not to contain any value of the held-out documents (case-insensitively, as the
"contains" metric compares), so an evaluation answer has never been seen in training.

Outputs of :func:`write_recall_corpus` (``linmix lm recall-corpus``)::

    train/recall_docs.jsonl      {"text": document with its questions and answers inline}
    train/mix_text.jsonl         plain-text passages (e.g. Shakespeare) at the stated ratio, if asked
    eval/recall_heldout.jsonl    held-out prompts {"text", "value", metadata...} for `linmix lm eval --recall`
    eval/recall_heldout_<lo>-<hi>.jsonl   the same records split by context length (tokens)
    eval/heldout_docs.jsonl      {"text", "doc_id"}: the whole held-out documents the prompts are cut from,
                                 in training format (every question answered), for held-out perplexity
    meta.json                    the settings and counts

Lengths are counted in tokens of the byte-level tokenizer (UTF-8 bytes: all text here is ASCII),
which is the LM trainer's default. Evaluation prompts end in ``"A:"``; the gold ``value`` is the
answer, and the trained format puts it right after (`` value\\n``), so a greedy generation cut at
the newline contains it exactly when the model recalled it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from pathlib import Path

__all__ = [
    "RecallCorpusConfig", "RecallDocument", "generate_document", "heldout_eval_records", "heldout_value_index", "load_recall_eval",
    "recall_breakdown", "write_recall_corpus",
]

LAYOUTS = ("prose", "key_value", "table")
SCHEMAS = ("person", "product")
DEFAULT_LENGTH_BUCKETS = (256, 512, 1024, 2048)

# ---------------------------------------------------------------------------------- vocabularies
_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr",
           "v", "w", "z", "ch", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ea")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")
_CITY_SUFFIXES = ("ford", "ton", "ville", "burg", "port", "field", "haven", "mouth", "stead", "wick", "moor", "dale")
_COMPANY_SUFFIXES = ("Works", "Labs", "Industries", "Group", "Trading", "Holdings", "Systems", "Foundry", "Partners")
_PRODUCT_NOUNS = ("Kettle", "Lamp", "Drill", "Bicycle", "Camera", "Heater", "Blender", "Speaker", "Toaster", "Scanner",
                  "Router", "Mixer", "Compass", "Telescope", "Radio", "Clock", "Printer", "Stove")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I / O: they read as digits

# Held-out values are those whose hash falls in the first HELDOUT_FRACTION of the range.
HELDOUT_FRACTION = 0.2


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(syllables)).capitalize()


def _person_name(rng):
    return f"{_word(rng, rng.choice((2, 2, 3)))} {_word(rng, rng.choice((2, 3)))}"


def _city(rng):
    return _word(rng, rng.choice((1, 2))) + rng.choice(_CITY_SUFFIXES)


def _company(rng):
    return f"{_word(rng, rng.choice((2, 3)))} {rng.choice(_COMPANY_SUFFIXES)}"


def _date(rng):
    return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1900, 2030)}"


def _seven_digits(rng):
    return str(rng.randint(1_000_000, 9_999_999))


def _product_code(rng):
    letters = "".join(rng.choice(_LETTERS) for _ in range(2))
    return f"{letters}-{rng.randint(1000, 9999)}-{rng.choice(_LETTERS)}"


def _price(rng):
    return f"${rng.randint(1, 9)},{rng.randint(0, 999):03d}.{rng.randint(0, 99):02d}"


def _product_name(rng):
    return f"{_word(rng, rng.choice((2, 3)))} {rng.choice(_PRODUCT_NOUNS)}"


@dataclasses.dataclass(frozen=True)
class _Attribute:
    key: str  # field name in records
    label: str  # key-value list / table header
    kind: str  # which vocabulary (the hash split is per kind)
    draw: object
    questions: tuple[str, ...]  # {key} is the record's name
    prose: tuple[str, ...]  # {name} and {value}


_SCHEMAS: dict[str, tuple[_Attribute, ...]] = {
    "person": (
        _Attribute("name", "Name", "person", _person_name, (), ()),
        _Attribute("hometown", "Hometown", "city", _city,
                   ("Where is {key} from?", "What is the hometown of {key}?"),
                   ("{name} grew up in {value}.", "{name} comes from {value}.")),
        _Attribute("birth_date", "Date of birth", "date", _date,
                   ("When was {key} born?", "What is the date of birth of {key}?"),
                   ("{name} was born on {value}.", "The birthday of {name} is {value}.")),
        _Attribute("employer", "Employer", "company", _company,
                   ("Who employs {key}?", "Which company does {key} work for?"),
                   ("{name} works for {value}.", "{name} is employed by {value}.")),
        _Attribute("employee_number", "Employee number", "number", _seven_digits,
                   ("What is the employee number of {key}?",),
                   ("The employee number of {name} is {value}.", "{name} has employee number {value}.")),
    ),
    "product": (
        _Attribute("name", "Product", "product", _product_name, (), ()),
        _Attribute("code", "Product code", "code", _product_code,
                   ("What is the product code of the {key}?",),
                   ("The {name} is listed under code {value}.", "The code of the {name} is {value}.")),
        _Attribute("maker", "Manufacturer", "company", _company,
                   ("Who makes the {key}?", "Which company manufactures the {key}?"),
                   ("The {name} is made by {value}.", "{value} manufactures the {name}.")),
        _Attribute("price", "Price", "price", _price,
                   ("How much does the {key} cost?", "What is the price of the {key}?"),
                   ("The {name} sells for {value}.", "The price of the {name} is {value}.")),
        _Attribute("release_date", "Release date", "date", _date,
                   ("When was the {key} released?",),
                   ("The {name} was released on {value}.", "The {name} came out on {value}.")),
        _Attribute("factory", "Made in", "city", _city,
                   ("Where is the {key} made?", "In which city is the {key} made?"),
                   ("The {name} is assembled in {value}.", "The {name} is made in {value}.")),
    ),
}
_TITLES = {
    "person": ("Personnel records, sheet {n}", "Staff directory, page {n}", "Member register, volume {n}",
               "Contact sheet no. {n}"),
    "product": ("Product catalogue, page {n}", "Inventory list no. {n}", "Price sheet, edition {n}",
                "Shipping manifest {n}"),
}
# Filler notes: text that carries no attribute values (they pad documents to a target length
# independently of the number of records).
_FILLER = (
    "The records below were copied from the original ledger and checked twice.",
    "Entries are listed in no particular order.",
    "Please report any mistakes to the front office before the end of the month.",
    "Some fields were left blank in the source and have been filled in from later files.",
    "This page replaces all earlier versions of the list.",
    "The office is closed on public holidays; requests sent then are answered the next working day.",
    "Copies of this sheet may be made for internal use only.",
    "A second copy is kept in the archive on the ground floor.",
    "Where two sources disagreed, the more recent one was used.",
    "The list is updated at the start of every quarter.",
    "Handwritten notes in the margin were not transcribed.",
    "Questions about a single entry should quote the name exactly as written here.",
    "Nothing on this page should be read as an endorsement.",
    "Older entries may use a different spelling of the same place.",
    "The numbers in this list are for reference and are not account numbers.",
    "Ink stains on the original made a few lines hard to read.",
    "Anyone who finds an entry out of date is asked to say so.",
    "Each entry was confirmed by telephone where possible.",
)


def _hash_fraction(kind: str, value: str) -> float:
    digest = hashlib.blake2b(f"{kind}:{value}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") / 2**32


def is_heldout_value(kind: str, value: str) -> bool:
    """Whether ``value`` of vocabulary ``kind`` belongs to the held-out part (about HELDOUT_FRACTION of each)."""
    return _hash_fraction(kind, value) < HELDOUT_FRACTION


def _draw(rng: random.Random, attribute: _Attribute, heldout: bool, taken: set[str]) -> str:
    """A value of ``attribute`` from the held-out or the training part of its vocabulary that neither
    contains nor is contained in a value of ``taken`` (lower-case), so each value occurs once in its document."""
    for _ in range(10_000):
        value = attribute.draw(rng)
        lowered = value.lower()
        if is_heldout_value(attribute.kind, value) == heldout and not any(lowered in t or t in lowered for t in taken):
            return value
    raise RuntimeError(f"could not draw a fresh {attribute.kind!r} value (vocabulary exhausted?)")


# ---------------------------------------------------------------------------------- documents
@dataclasses.dataclass
class RecallDocument:
    """One generated document: ``body`` (title, records, filler), its records and questions.

    ``questions``: ``(question, answer, record index, attribute key)`` in the order they are asked.
    ``values``: every attribute value in the document (what the held-out check protects).
    """

    body: str
    schema: str
    layout: str
    records: list[dict[str, str]]
    questions: list[tuple[str, str, int, str]]
    values: list[str]

    def text(self, answered: int | None = None) -> str:
        """The body, then the first ``answered`` questions with their answers (all by default)."""
        count = len(self.questions) if answered is None else answered
        return self.body + "".join(f"Q: {q}\nA: {a}\n" for q, a, _, _ in self.questions[:count])

    def prompt(self, question_index: int) -> str:
        """The body, the questions before ``question_index`` answered, then that one ending in "A:"."""
        question = self.questions[question_index][0]
        return self.text(answered=question_index) + f"Q: {question}\nA:"


def _render_record(schema: str, record: dict[str, str], layout: str, rng: random.Random) -> str:
    attributes = _SCHEMAS[schema]
    name = record["name"]
    if layout == "key_value":
        return "\n".join(f"{a.label}: {record[a.key]}" for a in attributes) + "\n"
    # prose: one sentence per attribute in a random order, the name spelled in full every time
    sentences = [rng.choice(a.prose).format(name=name, value=record[a.key]) for a in attributes[1:]]
    rng.shuffle(sentences)
    return " ".join(sentence[0].upper() + sentence[1:] for sentence in sentences) + "\n"


def _render_table(schema: str, records: list[dict[str, str]]) -> str:
    attributes = _SCHEMAS[schema]
    lines = ["| " + " | ".join(a.label for a in attributes) + " |", "|" + "---|" * len(attributes)]
    lines += ["| " + " | ".join(record[a.key] for a in attributes) + " |" for record in records]
    return "\n".join(lines) + "\n"


def _assemble(title: str, schema: str, layout: str, records: list[dict[str, str]], fillers: list[str],
              rng_state: tuple) -> str:
    """Title, then records and filler notes interleaved (a table stays one block, notes around it)."""
    rng = random.Random()
    rng.setstate(rng_state)  # the same draws however often a document is re-assembled while sizing it
    parts = [title + "\n"]
    if layout == "table":
        before = fillers[: len(fillers) // 2]
        after = fillers[len(fillers) // 2 :]
        if before:
            parts.append(" ".join(before) + "\n")
        parts.append(_render_table(schema, records))
        if after:
            parts.append(" ".join(after) + "\n")
    else:
        blocks = [_render_record(schema, record, layout, rng) for record in records]
        # filler notes go between records at positions fixed by the shared state
        slots = [rng.randrange(len(blocks) + 1) for _ in fillers]
        merged: list[str] = []
        for index in range(len(blocks) + 1):
            notes = [note for note, slot in zip(fillers, slots) if slot == index]
            if notes:
                merged.append(" ".join(notes) + "\n")
            if index < len(blocks):
                merged.append(blocks[index])
        parts += merged
    return "\n".join(parts) + "\n"


def _questions_text_bytes(questions: list[tuple[str, str, int, str]]) -> int:
    return sum(len(f"Q: {q}\nA: {a}\n".encode()) for q, a, _, _ in questions)


def generate_document(rng: random.Random, *, heldout: bool, target_tokens: int, num_questions: int,
                      min_tokens: int, max_tokens: int, schema: str | None = None, layout: str | None = None) -> RecallDocument:
    """One document of about ``target_tokens`` bytes including its ``num_questions`` answered questions,
    never outside ``[min_tokens, max_tokens]`` (raises if the range cannot hold a record and its questions).

    Records get values from the held-out or the training vocabularies (``heldout``); all values in a
    document are distinct (case-insensitively), so each answer occurs exactly once before the questions.
    """
    schema = schema or rng.choice(SCHEMAS)
    layout = layout or rng.choice(LAYOUTS)
    attributes = _SCHEMAS[schema]
    title = rng.choice(_TITLES[schema]).format(n=rng.randint(2, 999))
    taken: set[str] = set()

    def new_record() -> dict[str, str]:
        record = {}
        for attribute in attributes:
            record[attribute.key] = _draw(rng, attribute, heldout, taken)
            taken.add(record[attribute.key].lower())
        return record

    def ask(record_index: int, record: dict[str, str]) -> tuple[str, str, int, str]:
        attribute = rng.choice(attributes[1:])
        return rng.choice(attribute.questions).format(key=record["name"]), record[attribute.key], record_index, attribute.key

    # Records: between a third of what fits in the target and all of it (at least one); filler pads the rest,
    # so length and number of records are not tied one to one.
    render_state = rng.getstate()
    probe = [new_record() for _ in range(3)]
    per_record = max(1, len(_assemble(title, schema, layout, probe, [], render_state).encode())
                     - len(_assemble(title, schema, layout, probe[:2], [], render_state).encode()))
    question_room = num_questions * 70
    capacity = max(1, (target_tokens - question_room - len(title) - 4) // per_record)
    num_records = rng.randint(max(1, capacity // 3), capacity)
    records = probe[:num_records] + [new_record() for _ in range(num_records - len(probe))]
    asked = rng.sample(range(num_records), k=min(num_questions, num_records))
    asked += [rng.randrange(num_records) for _ in range(num_questions - len(asked))]
    questions: list[tuple[str, str, int, str]] = []
    for index in asked:  # the same (record, attribute) is never asked twice
        for _ in range(20):
            question = ask(index, records[index])
            if all(question[3] != q[3] or question[2] != q[2] for q in questions):
                questions.append(question)
                break
    fillers: list[str] = []
    filler_pool = list(_FILLER)
    render_state = rng.getstate()

    def size() -> int:
        return len(_assemble(title, schema, layout, records, fillers, render_state).encode()) + _questions_text_bytes(questions)

    # Pad towards the target with filler, then trim (filler first, then unasked records) into range.
    while size() < target_tokens:
        if not filler_pool:
            filler_pool = list(_FILLER)
        fillers.append(filler_pool.pop(rng.randrange(len(filler_pool))))
    if size() > max(target_tokens, min_tokens) + 40 and fillers:
        fillers.pop()
    while size() > max_tokens:
        unasked = [i for i in range(len(records)) if i not in {q[2] for q in questions}]
        if fillers:
            fillers.pop()
        elif unasked:
            drop = unasked[-1]
            records.pop(drop)
            questions = [(q, a, i - (i > drop), k) for q, a, i, k in questions]
        else:
            raise ValueError(f"max_tokens={max_tokens} cannot hold a document with {len(questions)} questions")
    while size() < min_tokens:
        fillers.append(rng.choice(_FILLER))
    body = _assemble(title, schema, layout, records, fillers, render_state)
    values = [record[a.key] for record in records for a in attributes]
    return RecallDocument(body, schema, layout, records, questions, values)


# ---------------------------------------------------------------------------------- held-out guard
class _SubstringIndex:
    """Finds whether any of many strings occurs in a text (case-insensitively) in one pass over the text:
    the strings are indexed by their first 4 characters."""

    PREFIX = 4

    def __init__(self, strings):
        self.by_prefix: dict[str, list[str]] = {}
        for string in {s.lower() for s in strings}:
            if len(string) < self.PREFIX:
                raise ValueError(f"held-out value {string!r} is too short to be checked (needs >= {self.PREFIX} chars)")
            self.by_prefix.setdefault(string[: self.PREFIX], []).append(string)

    def find(self, text: str) -> str | None:
        lowered = text.lower()
        get = self.by_prefix.get
        for position in range(len(lowered) - self.PREFIX + 1):
            candidates = get(lowered[position : position + self.PREFIX])
            if candidates:
                for string in candidates:
                    if lowered.startswith(string, position):
                        return string
        return None


def heldout_value_index(values) -> _SubstringIndex:
    """An index over held-out values; ``.find(text)`` returns one that occurs in ``text`` (or None)."""
    return _SubstringIndex(values)


# ---------------------------------------------------------------------------------- the corpus
@dataclasses.dataclass
class RecallCorpusConfig:
    """Settings of :func:`write_recall_corpus`; defaults give a ~2M-token training set and 600 eval prompts.

    ``train_tokens``: tokens (bytes) of training text in all, mixed-in text included.
    ``mix_text``: a .txt / .jsonl file or folder of plain text (e.g. the Shakespeare ``train/`` split
    of ``benchmarks/lm_corpus.py``) to mix in; ``mix_ratio``: its share of ``train_tokens`` (0 = none).
    ``min_tokens`` / ``max_tokens``: range of a document's length (an eval prompt's, or a training
    document's with its answers); 2000 keeps eval prompts whole under `linmix lm eval`'s default
    2048-token window less 48 new tokens. ``length_buckets``: edges of the eval files by length.
    """

    seed: int = 0
    train_tokens: int = 2_000_000
    eval_docs: int = 600
    min_tokens: int = 256
    max_tokens: int = 2000
    train_questions: tuple[int, int] = (2, 6)
    eval_shots: tuple[int, int] = (0, 2)
    mix_text: str | None = None
    mix_ratio: float = 0.0
    length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS

    def __post_init__(self) -> None:
        for name in ("train_tokens", "min_tokens", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.eval_docs, bool) or not isinstance(self.eval_docs, int) or self.eval_docs < 0:
            raise ValueError(f"eval_docs must be a non-negative integer, got {self.eval_docs!r}")
        if self.min_tokens < 200 or self.max_tokens < self.min_tokens + 100:
            raise ValueError(f"need min_tokens >= 200 and max_tokens >= min_tokens + 100 (room for records and "
                             f"questions), got {self.min_tokens} and {self.max_tokens}")
        if not 0.0 <= self.mix_ratio < 1.0:
            raise ValueError(f"mix_ratio must lie in [0, 1), got {self.mix_ratio}")
        if self.mix_ratio > 0 and not self.mix_text:
            raise ValueError("mix_ratio > 0 needs mix_text (a plain-text file or folder to mix in)")
        low, high = self.train_questions
        if not 1 <= low <= high:
            raise ValueError(f"train_questions must be (low, high) with 1 <= low <= high, got {self.train_questions}")
        low, high = self.eval_shots
        if not 0 <= low <= high:
            raise ValueError(f"eval_shots must be (low, high) with 0 <= low <= high, got {self.eval_shots}")
        self.train_questions, self.eval_shots = tuple(self.train_questions), tuple(self.eval_shots)
        self.length_buckets = tuple(sorted(self.length_buckets))


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def bucket_name(tokens: int, edges: tuple[int, ...]) -> str:
    """``"256-511"`` style name of the bucket holding ``tokens`` (edges[i] <= tokens < edges[i+1])."""
    for low, high in zip(edges, edges[1:]):
        if low <= tokens < high:
            return f"{low}-{high - 1}"
    if tokens < edges[0]:
        return f"0-{edges[0] - 1}"
    return f"{edges[-1]}-"


def heldout_eval_records(config: RecallCorpusConfig) -> list[dict]:
    """The held-out prompts of ``config``, their context lengths spread evenly over the length buckets
    (log-uniform inside each). Each record also carries ``all_values``: every attribute value of its
    document (what must never occur in training text), and ``document``: the whole document in training
    format, of which ``text`` is a prefix (neither is written to the prompt files)."""
    edges = [max(config.min_tokens, e) for e in config.length_buckets if e < config.max_tokens] + [config.max_tokens]
    ranges = [(low, high) for low, high in zip(edges, edges[1:]) if high > low] or [(config.min_tokens, config.max_tokens)]
    records = []
    for index in range(config.eval_docs):
        rng = random.Random(f"linmix-recall-corpus/{config.seed}/eval/{index}")
        low, high = ranges[index % len(ranges)]
        shots = rng.randint(*config.eval_shots)
        document = generate_document(rng, heldout=True, target_tokens=_log_uniform(rng, low, high), num_questions=shots + 1,
                                     min_tokens=config.min_tokens, max_tokens=config.max_tokens)
        asked = len(document.questions) - 1
        prompt = document.prompt(asked)
        _, answer, record_index, attribute = document.questions[asked]
        tokens = len(prompt.encode())
        records.append({
            "text": prompt, "value": answer, "context_tokens": tokens,
            "length_bucket": bucket_name(tokens, config.length_buckets), "num_records": len(document.records),
            "layout": document.layout, "schema": document.schema, "attribute": attribute, "record_index": record_index,
            "answer_distance_tokens": tokens - len(prompt[: prompt.index(answer)].encode()),
            "shots": asked, "doc_id": f"heldout-{index}", "all_values": document.values, "document": document.text(),
        })
    return records


def _mix_passages(config: RecallCorpusConfig, budget: int, guard: _SubstringIndex, rng: random.Random) -> list[str]:
    """Passages of the mix text (whole lines, 256..2048 bytes) drawn at random until ``budget`` bytes."""
    from linmix.lm.data import iter_documents

    lines = [line for document in iter_documents(config.mix_text) for line in document.splitlines()]
    if sum(len(line) for line in lines) < 1000:
        raise ValueError(f"mix_text {config.mix_text} holds too little text to mix in")
    passages, total, rejected = [], 0, 0
    while total < budget:
        start = rng.randrange(len(lines))
        target = rng.randint(256, 2048)
        passage, size = [], 0
        for line in lines[start:]:
            if size + len(line) + 1 > target and passage:
                break
            passage.append(line)
            size += len(line) + 1
        text = "\n".join(passage).strip()
        if not text:
            continue
        if guard.find(text) is not None:
            rejected += 1  # a held-out value inside the plain text: leave the passage out
            if rejected > 1000:
                raise RuntimeError("too many mix-text passages contain held-out values")
            continue
        passages.append(text)
        total += len(text.encode())
    return passages


def write_recall_corpus(out_dir, config: RecallCorpusConfig | None = None, **overrides) -> dict:
    """Write the training files, the held-out eval files and meta.json under ``out_dir``; returns the meta.

    Held-out documents come first: the training documents are then drawn from the training part of
    every vocabulary and any document containing one of the held-out values is redrawn.
    """
    config = dataclasses.replace(config or RecallCorpusConfig(), **overrides)
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(parents=True, exist_ok=True)

    records = heldout_eval_records(config)
    guard = _SubstringIndex({value for record in records for value in record["all_values"]})

    recall_budget = int(round(config.train_tokens * (1.0 - config.mix_ratio)))
    train_path = out / "train" / "recall_docs.jsonl"
    train_bytes, train_docs, redrawn, index = 0, 0, 0, 0
    layouts = {layout: 0 for layout in LAYOUTS}
    with train_path.open("w", encoding="utf-8") as handle:
        while train_bytes < recall_budget:
            rng = random.Random(f"linmix-recall-corpus/{config.seed}/train/{index}")
            index += 1
            document = generate_document(
                rng, heldout=False, target_tokens=_log_uniform(rng, config.min_tokens, config.max_tokens),
                num_questions=rng.randint(*config.train_questions), min_tokens=config.min_tokens,
                max_tokens=config.max_tokens)
            text = document.text()
            if guard.find(text) is not None:
                redrawn += 1  # a held-out value showed up (as a substring): this document is left out
                continue
            handle.write(json.dumps({"text": text}) + "\n")
            train_bytes += len(text.encode())
            train_docs += 1
            layouts[document.layout] += 1

    mix_bytes, mix_passages = 0, 0
    mix_path = out / "train" / "mix_text.jsonl"
    mix_path.unlink(missing_ok=True)
    if config.mix_ratio > 0:
        budget = int(round(config.train_tokens * config.mix_ratio))
        passages = _mix_passages(config, budget, guard, random.Random(f"linmix-recall-corpus/{config.seed}/mix"))
        with mix_path.open("w", encoding="utf-8") as handle:
            for passage in passages:
                handle.write(json.dumps({"text": passage}) + "\n")
        mix_bytes, mix_passages = sum(len(p.encode()) for p in passages), len(passages)

    for stale in (out / "eval").glob("recall_heldout*.jsonl"):
        stale.unlink()
    eval_files = {"all": str(out / "eval" / "recall_heldout.jsonl")}
    rows = [{k: v for k, v in record.items() if k not in ("all_values", "document")} for record in records]
    _write_jsonl(out / "eval" / "recall_heldout.jsonl", rows)
    for bucket in sorted({row["length_bucket"] for row in rows}, key=lambda b: int(b.split("-")[0])):
        path = out / "eval" / f"recall_heldout_{bucket.rstrip('-')}.jsonl"
        _write_jsonl(path, [row for row in rows if row["length_bucket"] == bucket])
        eval_files[bucket] = str(path)
    # The complete held-out documents (answers inline, as training text is): `linmix lm eval --data` on
    # this file gives the corpus's held-out perplexity on text no training document shares a value with.
    heldout_docs_path = out / "eval" / "heldout_docs.jsonl"
    _write_jsonl(heldout_docs_path, [{"text": record["document"], "doc_id": record["doc_id"]} for record in records])

    meta = {
        "config": dataclasses.asdict(config),
        "tokenizer": "byte (UTF-8 bytes; every token count here is a byte count)",
        "train": {"recall_docs": train_docs, "recall_tokens": train_bytes, "redrawn_for_heldout_values": redrawn,
                  "layouts": layouts, "mix_passages": mix_passages, "mix_tokens": mix_bytes,
                  "mix_share": mix_bytes / max(1, mix_bytes + train_bytes)},
        "eval": {"records": len(rows), "heldout_values": len({value for r in records for value in r["all_values"]}),
                 "files": eval_files, "heldout_docs": str(heldout_docs_path),
                 "heldout_doc_tokens": sum(len(record["document"].encode()) for record in records),
                 "by_length_bucket": {b: sum(r["length_bucket"] == b for r in rows) for b in sorted({r["length_bucket"] for r in rows})}},
        "heldout_fraction_of_each_vocabulary": HELDOUT_FRACTION,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def load_recall_eval(path) -> list[dict]:
    """The eval records of ``path`` with all their metadata (``linmix.lm.evaluate.load_recall_records``
    keeps only ``text`` and ``value``)."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [i for i, row in enumerate(rows) if "text" not in row or "value" not in row]
    if missing:
        raise ValueError(f"{path} records {missing[:5]} lack 'text' or 'value'")
    return rows


def recall_breakdown(records: list[dict], generations: list[str], by: str = "length_bucket") -> dict[str, dict]:
    """Contains-accuracy of ``generations`` (e.g. ``linmix lm eval --json-out``'s ``generations``, in
    record order) grouped by a metadata field: ``{group: {"contains", "correct", "n"}}``."""
    from linmix.lm.evaluate import contains_score

    if len(records) != len(generations):
        raise ValueError(f"{len(records)} records but {len(generations)} generations")
    groups: dict[str, list[float]] = {}
    for record, generation in zip(records, generations):
        if by not in record:
            raise ValueError(f"record has no field {by!r} (fields: {sorted(record)})")
        groups.setdefault(str(record[by]), []).append(contains_score(generation, record["value"]))
    return {group: {"contains": sum(s) / len(s), "correct": int(sum(s)), "n": len(s)} for group, s in sorted(groups.items())}


def answer_token_positions(tokenizer, text: str, value: str) -> dict:
    """Where ``value`` is stated in a recall document and where it is answered, in tokens of ``text``.

    ``value`` must occur at least twice: first in the records (the first occurrence) and last as the
    final answer. Returns the token ids and, for both occurrences, the positions of the tokens lying
    wholly inside the value after the one that starts it (``record_continuation`` /
    ``answer_continuation``), plus ``answer_first``, the token where the answer starts. The first
    token of an answer needs the model to find the record; the continuation tokens only need it to
    copy what it has already started, so their loss at the answer against their loss at the record,
    where nothing earlier tells it the value, measures in-context copying.
    """
    first, last = text.find(value), text.rfind(value)
    if not value or first < 0 or first == last:
        raise ValueError(f"the value {value!r} must occur at least twice in the document (in a record and as its answer)")
    ids, offsets = tokenizer.encode_with_offsets(text)

    def inside(start: int) -> list[int]:
        end = start + len(value)
        return [i for i, (a, b) in enumerate(offsets) if start < a and b <= end]

    answer_first = next(i for i, (a, b) in enumerate(offsets) if a <= last < b)
    return {"ids": ids, "record_continuation": inside(first), "answer_continuation": inside(last),
            "answer_first": answer_first}


def answer_copy_probe(model, tokenizer, documents: list[str], values: list[str]) -> dict:
    """Mean next-token loss (nats) of each document's answer ``value`` where it is stated in a record and
    where it is answered (see :func:`answer_token_positions`), over ``documents`` (whole held-out
    documents, answers inline: ``eval/heldout_docs.jsonl``; ``values``: their final answers).

    ``copy_gain`` = record continuation loss - answer continuation loss: about 0 for a model that does
    not copy from its context, and as large as the record loss for one that copies perfectly.
    ``answer_first`` is the loss of the answer's first token (finding the right record and attribute).
    """
    import torch

    if len(documents) != len(values) or not documents:
        raise ValueError(f"need one value per document and at least one document, got {len(documents)} and {len(values)}")
    sums = {"record_continuation": [0.0, 0], "answer_continuation": [0.0, 0], "answer_first": [0.0, 0]}
    parameter = next(model.parameters())
    with torch.no_grad():
        for text, value in zip(documents, values):
            found = answer_token_positions(tokenizer, text, value)
            ids = torch.tensor([found["ids"]], dtype=torch.long, device=parameter.device)
            logits = model(ids).logits[0, :-1].float()
            # nll[i] is the loss of token i + 1 given tokens 0..i
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            # every scored token follows the value's first occurrence, so none is token 0
            for key in ("record_continuation", "answer_continuation"):
                positions = [i - 1 for i in found[key]]
                sums[key][0] += float(nll[positions].sum()) if positions else 0.0
                sums[key][1] += len(positions)
            sums["answer_first"][0] += float(nll[found["answer_first"] - 1])
            sums["answer_first"][1] += 1
    result = {key: total / max(1, count) for key, (total, count) in sums.items()}
    result["copy_gain"] = result["record_continuation"] - result["answer_continuation"]
    result.update(documents=len(documents), continuation_tokens=sums["answer_continuation"][1])
    return result
