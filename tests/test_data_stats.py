"""`data stats` top n-grams are exact over the whole corpus (brute-force reference: one Counter over every
document), however the counts are spread over shards."""

from collections import Counter

from lmforge.curation.documents import DocumentWriter
from lmforge.curation.stats import StatsConfig, run_stats

FILLERS_PER_SHARD = 20_001  # more distinct words per shard than any per-shard cut-off would keep


def _corpus(root):
    docs = []
    for shard in range(6):
        words = [f"w{shard}x{i}" for i in range(FILLERS_PER_SHARD)]
        # each filler twice within its shard; "Rare" once per shard: 6 in all, the corpus's most frequent word
        text = " ".join(words + words + ["Rare", "the end"])
        docs.append(text)
        with DocumentWriter(root / "documents" / f"s{shard}.jsonl.gz") as w:
            w.write({"id": str(shard), "text": text, "source": "web"})
    return docs


def test_top_ngrams_are_exact_across_shards(tmp_path):
    docs = _corpus(tmp_path)
    report = run_stats(StatsConfig(documents=[str(tmp_path / "documents/*.jsonl.gz")], out=str(tmp_path / "stats"),
                                   top_k=5, ngram_sizes=[1, 2], langid=False, plots=False))
    assert report["documents"] == 6
    import json

    top = json.loads((tmp_path / "stats" / "stats.json").read_text())["top_ngrams"]
    for n in (1, 2):
        counts = Counter()
        for text in docs:
            words = text.lower().split()
            counts.update(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
        expected = sorted(counts.items(), key=lambda gc: (-gc[1], gc[0]))[:5]  # ties: alphabetical
        assert [tuple(p) for p in top[str(n)]] == expected, n
    assert ["rare", 6] in top["1"]
    assert not list((tmp_path / "stats").glob(".*ngram*"))  # the spilled counts are cleaned up
