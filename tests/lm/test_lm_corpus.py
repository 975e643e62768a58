"""The recall fixture builder of benchmarks/lm_corpus.py (the download itself needs the network)."""
from helpers import load_benchmark


def test_recall_records_ask_for_the_next_two_words_of_a_line_in_the_passage():
    corpus = load_benchmark("lm_corpus")
    play = "\n".join(f"LINE{i}.\nword{i}a word{i}b word{i}c word{i}d word{i}e word{i}f word{i}g word{i}h\n"
                     for i in range(200))
    records = corpus.recall_records([play], n=20, seed=1)
    assert len(records) == 20
    for record in records:
        passage, _, cue = record["text"].rpartition("\n\n")
        assert len(record["text"].encode()) <= 480
        cue_words, value_words = cue.split(), record["value"].split()
        assert len(value_words) == 2 and len(cue_words) >= 3
        line = next(line for line in passage.splitlines() if line.startswith(cue))  # the cue opens a passage line
        assert line.split()[len(cue_words) : len(cue_words) + 2] == value_words  # the gold is what follows it
        # that line starts at least 100 bytes before the end of the passage (outside a 64-token window)
        assert len(passage) - passage.index(line) >= 100
        assert record["text"].count(record["value"]) == 1  # only in the passage line, never in the cue
