"""MinHash clusters with verified pairs, and exact-substring dedup, against brute-force references."""

import itertools
import json
import os
import random
import shutil

import numpy as np
import pytest

from lmforge.core.config import load_config
from lmforge.core.errors import LmforgeError
from lmforge.core.executor import ExecutorConfig
from lmforge.curation.attributes import attribute_path, read_attributes
from lmforge.curation.dedup import DedupConfig, run_dedup
from lmforge.curation.documents import DocumentWriter, read_documents
from lmforge.curation.fuzzy import MinHashConfig, _merged_band
from lmforge.curation.mixer import MixerConfig, run_mix
from lmforge.curation.substring import SubstringConfig


def _write(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with DocumentWriter(path) as w:
        for d in docs:
            w.write(d)


def _rows(root, shard, name="dedup"):
    return dict(read_attributes(attribute_path(root / "documents" / shard, name)))


def _shingles(text, n=5):
    """The reference: the set of lowercased word n-grams as tuples."""
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a, b):
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def _words(rng, count):
    return [f"w{rng.randrange(100_000)}" for _ in range(count)]


def _edit(words, positions, rng):
    out = list(words)
    for p in positions:
        out[p] = f"x{rng.randrange(100_000)}"
    return " ".join(out)


def _minhash_run(root, name="dedup", **minhash):
    return run_dedup(DedupConfig(documents=[str(root / "documents" / "*.jsonl.gz")], modes=["minhash"], name=name,
                                 minhash=MinHashConfig(**minhash), executor=ExecutorConfig(progress=False)))


def test_verification_rejects_an_lsh_collision_below_the_threshold(tmp_path):
    rng = random.Random(0)
    base = _words(rng, 200)
    a, b = " ".join(base), _edit(base, range(0, 200, 7), rng)  # one word in 7 changed: Jaccard about 0.27
    true = _jaccard(a, b)
    assert 0.15 < true < 0.5
    _write(tmp_path / "documents" / "s.jsonl.gz", [{"id": "a", "text": a}, {"id": "b", "text": b}])
    # 64 bands of one row: the pair shares a band key unless all 64 minima differ (probability 0.73^64 ~ 2e-9)
    collide = dict(bands=64, rows=1, threshold=0.8)
    summary = _minhash_run(tmp_path, **collide)["minhash"]
    assert summary["candidate_pairs"] == 1 and summary["rejected_pairs"] == 1 and summary["clusters"] == 0
    assert _rows(tmp_path, "s.jsonl.gz")["b"]["dedup__near_duplicate"] == []
    # the same pair is accepted just below its true Jaccard, with the exact value as the score
    summary = _minhash_run(tmp_path, name="low", **{**collide, "threshold": true - 1e-9})["minhash"]
    assert summary["rejected_pairs"] == 0 and summary["clusters"] == 1
    rows = _rows(tmp_path, "s.jsonl.gz", "low")
    assert rows["b"]["low__near_duplicate"] == [[0, len(b), pytest.approx(true)]]
    assert rows["a"]["low__near_duplicate"] == [] and rows["a"]["low__cluster_size"] == [[0, len(a), 2.0]]


def _chain(rng):
    """A ~ B and B ~ C above 0.8, A and C below it."""
    base = _words(rng, 300)
    a = " ".join(base)
    b = _edit(base, range(0, 300, 75), rng)  # 4 words, 20 of 296 5-grams: Jaccard(A, B) = 276 / 316 = 0.87
    c = _edit(b.split(), range(37, 300, 75), rng)  # 4 more: Jaccard(A, C) = 256 / 336 = 0.76
    assert _jaccard(a, b) >= 0.85 and _jaccard(b, c) >= 0.85 and _jaccard(a, c) < 0.8
    return a, b, c


def test_clusters_are_transitive_and_keep_the_same_document_for_any_workers_or_shard_order(tmp_path):
    rng = random.Random(1)
    a, b, c = _chain(rng)
    other = " ".join(_words(rng, 300))
    docs = {"x.jsonl.gz": [{"id": "c", "text": c}, {"id": "o", "text": other}],
            "y.jsonl.gz": [{"id": "a", "text": a}], "z.jsonl.gz": [{"id": "b", "text": b}]}
    outcomes = []
    for workers, listed in ((1, ["x", "y", "z"]), (3, ["z", "y", "x"]), (2, ["y", "x", "z"])):
        root = tmp_path / f"run{workers}"
        for name, rows in docs.items():
            _write(root / "documents" / name, rows)
        summary = run_dedup(DedupConfig(documents=[str(root / "documents" / f"{s}.jsonl.gz") for s in listed],
                                        modes=["minhash"], executor=ExecutorConfig(workers=workers, progress=False)))
        rows = {**_rows(root, "x.jsonl.gz"), **_rows(root, "y.jsonl.gz"), **_rows(root, "z.jsonl.gz")}
        outcomes.append((rows, summary["minhash"]))
    rows, stats = outcomes[0]
    assert stats["clusters"] == 1 and stats["documents_in_clusters"] == 3 and stats["documents_removed"] == 2
    # c comes first in source order (x.jsonl.gz, line 1): kept, and the cluster's id is its position, 0
    assert rows["c"]["dedup__near_duplicate"] == [] and rows["o"]["dedup__cluster_size"] == []
    assert rows["a"]["dedup__near_duplicate"] and rows["b"]["dedup__near_duplicate"]
    assert {rows[d]["dedup__cluster_id"][0][2] for d in "abc"} == {0.0}
    assert {rows[d]["dedup__cluster_size"][0][2] for d in "abc"} == {3.0}
    assert all(outcome == outcomes[0] for outcome in outcomes)


def test_clusters_equal_the_connected_components_of_all_pairs_above_the_threshold(tmp_path):
    """Brute force: every pair's exact Jaccard, components by depth-first search."""
    rng = random.Random(2)
    texts = []
    for _ in range(12):
        base = _words(rng, rng.randrange(60, 200))
        texts.append(" ".join(base))
        for _ in range(rng.randrange(0, 3)):  # near copies with 1-3 words changed
            texts.append(_edit(base, rng.sample(range(len(base)), rng.randrange(1, 4)), rng))
    rng.shuffle(texts)
    texts += ["too short", "", "too short"]  # fewer than 5 words: counted, never clustered
    _write(tmp_path / "documents" / "a.jsonl.gz", [{"id": str(i), "text": t} for i, t in enumerate(texts[:20])])
    _write(tmp_path / "documents" / "b.jsonl.gz", [{"id": str(i + 20), "text": t} for i, t in enumerate(texts[20:])])
    summary = _minhash_run(tmp_path)
    rows = {**_rows(tmp_path, "a.jsonl.gz"), **_rows(tmp_path, "b.jsonl.gz")}

    n = len(texts)
    linked = {i: [j for j in range(n) if j != i and _shingles(texts[i]) and _shingles(texts[j])
                  and _jaccard(texts[i], texts[j]) >= 0.8] for i in range(n)}
    component = {}
    for start in range(n):
        stack = [start]
        while stack:
            i = stack.pop()
            if i not in component:
                component[i] = start
                stack.extend(linked[i])
    for i in range(n):
        members = [j for j in range(n) if component[j] == component[i]]
        size = rows[str(i)]["dedup__cluster_size"]
        assert (size[0][2] if size else 1) == len(members), i
        assert bool(rows[str(i)]["dedup__near_duplicate"]) == (min(members) != i), i
    assert sum(len(v) for v in linked.values()) > 10  # there were near duplicates to find
    assert summary["too_short_for_ngram"] == 3 and summary["near_duplicates"] == sum(
        min(j for j in range(n) if component[j] == component[i]) != i for i in range(n))


def test_a_memory_limit_below_the_data_spills_and_gives_the_same_clusters(tmp_path):
    rng = random.Random(3)
    a, b, c = _chain(rng)
    docs = [{"id": str(i), "text": " ".join(_words(rng, 50))} for i in range(30)]
    docs[5]["text"], docs[17]["text"], docs[29]["text"] = a, b, c
    _write(tmp_path / "documents" / "s.jsonl.gz", docs[:15])
    _write(tmp_path / "documents" / "t.jsonl.gz", docs[15:])
    roomy = _minhash_run(tmp_path)
    expected = [_rows(tmp_path, "s.jsonl.gz"), _rows(tmp_path, "t.jsonl.gz")]
    shutil.rmtree(tmp_path / "attributes")
    # 1000 bytes hold 83 (key, document) pairs, the 26 band keys of 3.2 documents: a run is spilled every 4
    # documents (4 runs per shard of 15)
    tight = _minhash_run(tmp_path, memory_mb=1000 / 2 ** 20)
    assert roomy["minhash"]["spilled_runs"] == 2 and tight["minhash"]["spilled_runs"] == 8
    assert [_rows(tmp_path, "s.jsonl.gz"), _rows(tmp_path, "t.jsonl.gz")] == expected
    assert tight["minhash"]["clusters"] == 1 and tight["minhash"]["documents_in_clusters"] == 3


@pytest.mark.parametrize("budget", [1, 4, 1000])
def test_the_bounded_merge_yields_sorted_whole_groups(budget):
    """Against one sort of everything: slices in (key, document) order that never cut a key's group."""
    rng = np.random.default_rng(budget)
    runs, everything, base = [], [], 0
    for size in (0, 7, 30, 12):
        keys = np.sort(rng.integers(0, 6, size=(2, size)).astype(np.uint64), axis=1)  # few keys: big groups
        docs = np.tile(np.arange(size, dtype=np.uint32), (2, 1))
        order = np.lexsort((docs[1], keys[1]))
        keys[1], docs[1] = keys[1][order], docs[1][order]
        runs.append((keys, docs, base))
        everything += [(int(k), int(d) + base) for k, d in zip(keys[1], docs[1])]
        base += size
    stats = {"merge_rounds": 0}
    slices = list(_merged_band(runs, 1, budget, stats))
    assert [(int(k), int(d)) for keys, docs in slices for k, d in zip(keys, docs)] == sorted(everything)
    assert len({int(keys[0]) for keys, _ in slices}) == len(slices)  # a key never spans two slices
    assert stats["merge_rounds"] == len(slices) and (len(slices) > 1) == (budget < 1000)


def test_documents_too_short_for_an_ngram_are_counted_and_never_duplicates(tmp_path):
    _write(tmp_path / "documents" / "s.jsonl.gz", [{"id": str(i), "text": t} for i, t in
                                                   enumerate(["one two three four", "one two three four", "", " ",
                                                              "one two three four"])])
    summary = _minhash_run(tmp_path, bands=8, rows=1)
    assert summary["too_short_for_ngram"] == 5 and summary["near_duplicates"] == 0
    assert summary["minhash"]["candidate_pairs"] == 0
    assert all(r["dedup__near_duplicate"] == [] for r in _rows(tmp_path, "s.jsonl.gz").values())


def test_strip_punctuation_makes_copies_that_differ_in_quotes_and_commas_one_cluster(tmp_path):
    quote = "Show business is just like high school, except you get paid. -- Martin Mull"
    _write(tmp_path / "documents" / "s.jsonl.gz", [{"id": "a", "text": quote},
                                                   {"id": "b", "text": '"' + quote.replace(",", " ,") + '"'}])
    assert _minhash_run(tmp_path, bands=32, rows=1)["minhash"]["clusters"] == 0  # 4 of 13 5-grams differ
    assert _minhash_run(tmp_path, name="p", bands=32, rows=1, strip_punctuation=True)["minhash"]["clusters"] == 1
    assert _rows(tmp_path, "s.jsonl.gz", "p")["b"]["p__near_duplicate"] == [[0, len(quote) + 3, 1.0]]


def test_estimated_verification_option(tmp_path):
    rng = random.Random(4)
    a, b, _ = _chain(rng)
    _write(tmp_path / "documents" / "s.jsonl.gz", [{"id": "a", "text": a}, {"id": "b", "text": b}])
    summary = _minhash_run(tmp_path, verify="estimate")
    assert summary["minhash"]["clusters"] == 1
    score = _rows(tmp_path, "s.jsonl.gz")["b"]["dedup__near_duplicate"][0][2]
    assert score * 286 == pytest.approx(round(score * 286))  # a fraction of the 26 x 11 signature values
    assert abs(score - _jaccard(a, b)) < 0.1


# ---------------------------------------------------------------- exact substrings

def _repeats_reference(texts, n):
    """Byte windows of n that occurred earlier (check, then insert, position by position), as character spans
    whose bytes are all inside such a window."""
    seen, out = set(), []
    for text in texts:
        data = text.encode()
        covered = [False] * len(data)
        for q in range(len(data) - n + 1):
            window = data[q:q + n]
            if window in seen:
                covered[q:q + n] = [True] * n
            else:
                seen.add(window)
        chars, i = [], 0
        for ch in text:
            width = len(ch.encode())
            chars.append(all(covered[i:i + width]))
            i += width
        spans, i = [], 0
        for value, group in itertools.groupby(chars):
            length = len(list(group))
            if value:
                spans.append([i, i + length])
            i += length
        out.append(spans)
    return out


def _prefix_of_bytes(text, at, low, high):
    """The characters of `text` from `at` whose UTF-8 length first reaches `low` (None past `high` or the end)."""
    for end in range(at + 1, len(text) + 1):
        size = len(text[at:end].encode())
        if size >= low:
            return text[at:end] if size <= high else None
    return None


def _planted_corpus(rng, n):
    """Random texts over 20 letters and 'é', then documents that copy a run of n to n + 15 bytes of an earlier
    one (a planted repeat) and the first n - 1 bytes of another (too short to count).
    Returns the texts and (document, copy, short) for each planted document."""
    def noise(length):
        return "".join(rng.choice("abcdefghijklmnopqrsté") for _ in range(length))
    texts = [noise(rng.randrange(30, 90)) for _ in range(6)]
    planted = []
    while len(planted) < 8:
        source = texts[rng.randrange(6)]
        copy = _prefix_of_bytes(source, rng.randrange(len(source)), rng.randrange(n, n + 15), n + 16)
        short = _prefix_of_bytes(texts[rng.randrange(6)], 0, n - 2, n - 1)
        if copy and short:  # around the pieces a letter no other document has: no repeat runs past them
            mark = "ABCDEFGH"[len(planted)]
            planted.append((len(texts), copy, short))
            texts.append(noise(rng.randrange(5, 20)) + mark + copy + mark + short + mark + noise(rng.randrange(0, 10)))
    return texts, planted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_substring_dedup_finds_exactly_the_repeats_of_at_least_n_bytes(tmp_path, seed):
    rng = random.Random(seed)
    n = 24
    texts, planted = _planted_corpus(rng, n)
    _write(tmp_path / "documents" / "a.jsonl.gz", [{"id": str(i), "text": t} for i, t in enumerate(texts[:7])])
    _write(tmp_path / "documents" / "b.jsonl.gz", [{"id": str(i + 7), "text": t} for i, t in enumerate(texts[7:])])
    summary = run_dedup(DedupConfig(documents=[str(tmp_path / "documents" / "*.gz")], modes=["substring"],
                                    substring=SubstringConfig(min_bytes=n), executor=ExecutorConfig(progress=False)))
    rows = {**_rows(tmp_path, "a.jsonl.gz"), **_rows(tmp_path, "b.jsonl.gz")}
    found = [[s[:2] for s in rows[str(i)]["dedup__duplicate_substrings"]] for i in range(len(texts))]
    assert found == _repeats_reference(texts, n)
    removed = ["".join(texts[i][s:e] for s, e in spans) for i, spans in enumerate(found)]
    assert not any(removed[:6])  # the first documents are all first occurrences
    for i, copy, short in planted:
        assert copy in removed[i] and short not in removed[i] and short in texts[i]
    assert summary["substring"]["duplicate_substring_bytes"] == sum(len(r.encode()) for r in removed)

    # The mixer deletes the spans: the planted copies go, the short pieces stay, and nothing else changes.
    config = {"streams": [{"name": "s", "documents": [str(tmp_path / "documents" / "*.gz")], "attributes": ["dedup"],
                           "span_replacement": [{"span": "dedup__duplicate_substrings", "replacement": ""}]}],
              "output": {"path": str(tmp_path / "mixed"), "compression": "none"}}
    (tmp_path / "mix.json").write_text(json.dumps(config))
    run_mix(load_config(MixerConfig, tmp_path / "mix.json"))
    out = {doc["id"]: doc["text"] for path in sorted((tmp_path / "mixed").glob("*.jsonl"))
           for _, doc in read_documents(path)}
    reference = _repeats_reference(texts, n)
    assert out == {str(i): "".join(t[s:e] for s, e in _complement(reference[i], len(t))) for i, t in enumerate(texts)}
    for i, copy, short in planted:
        assert copy not in out[str(i)] and short in out[str(i)]


def _complement(spans, length):
    reach = 0
    for s, e in spans:
        yield reach, s
        reach = e
    yield reach, length


def test_substring_dedup_over_the_memory_limit_searches_groups_of_shards_in_pairs_with_the_same_result(tmp_path):
    """Four shards, a limit that holds the largest two at once: groups of one or two shards, each searched
    paired with every earlier one,
    must mark exactly what one suffix array over everything marks (the brute-force reference)."""
    rng = random.Random(3)
    n = 24
    texts, _ = _planted_corpus(rng, n)
    cuts = [0, 4, 7, 11, len(texts)]
    for k in range(4):
        _write(tmp_path / "documents" / f"{k}.jsonl.gz",
               [{"id": str(i), "text": texts[i]} for i in range(cuts[k], cuts[k + 1])])
    sizes = [sum(len(t.encode()) for t in texts[cuts[k]:cuts[k + 1]]) for k in range(4)]
    limit_mb = 2 * max(sizes) / 2 ** 20  # a group holds one shard, a pair two
    summary = run_dedup(DedupConfig(documents=[str(tmp_path / "documents" / "*.gz")], modes=["substring"],
                                    substring=SubstringConfig(min_bytes=n, max_text_mb=limit_mb),
                                    executor=ExecutorConfig(progress=False)))
    rows = {k: v for s in range(4) for k, v in _rows(tmp_path, f"{s}.jsonl.gz").items()}
    found = [[s[:2] for s in rows[str(i)]["dedup__duplicate_substrings"]] for i in range(len(texts))]
    assert summary["substring"]["groups"] > 1 and found == _repeats_reference(texts, n)
    assert any(found)

    with pytest.raises(LmforgeError, match="more than half of substring.max_text_mb"):
        run_dedup(DedupConfig(documents=[str(tmp_path / "documents" / "*.gz")], modes=["substring"], name="small",
                              substring=SubstringConfig(min_bytes=n, max_text_mb=1.5 * max(sizes) / 2 ** 20),
                              executor=ExecutorConfig(progress=False)))


def test_a_repeat_that_begins_or_ends_inside_a_character_removes_whole_characters_only(tmp_path):
    # 'é' is C3 A9, '©' C2 A9 and 'è' C3 A8: the repeated bytes are A9 + R + C3, 28 of them
    r = "klmnopqrstuvwxyz0123456789"
    _write(tmp_path / "documents" / "s.jsonl.gz", [{"id": "1", "text": "é" + r + "é"}, {"id": "2", "text": "©" + r + "è"}])
    summary = run_dedup(DedupConfig(documents=[str(tmp_path / "documents" / "*.gz")], modes=["substring"],
                                    substring=SubstringConfig(min_bytes=20), executor=ExecutorConfig(progress=False)))
    rows = _rows(tmp_path, "s.jsonl.gz")
    assert rows["1"]["dedup__duplicate_substrings"] == [] and summary["substring"]["duplicate_substring_bytes"] == 28
    assert rows["2"]["dedup__duplicate_substrings"] == [[1, 27, 1.0]]  # R, without the '©' or the 'è' it cuts


def test_substring_and_minhash_resume_after_an_interruption_to_the_same_attributes(tmp_path, monkeypatch):
    rng = random.Random(5)
    a, b, c = _chain(rng)
    texts, _ = _planted_corpus(rng, 24)

    def corpus(root):
        _write(root / "documents" / "a.jsonl.gz", [{"id": "a", "text": a}] + [
            {"id": f"t{i}", "text": t} for i, t in enumerate(texts[:6])])
        _write(root / "documents" / "b.jsonl.gz", [{"id": "b", "text": b}, {"id": "c", "text": c}] + [
            {"id": f"t{i + 6}", "text": t} for i, t in enumerate(texts[6:])])

    def dedup(root):
        return run_dedup(DedupConfig(documents=[str(root / "documents" / "*.gz")],
                                     modes=["doc", "minhash", "substring"], state=str(root / "state"),
                                     substring=SubstringConfig(min_bytes=24), executor=ExecutorConfig(progress=False)))

    def outcome(root):
        return [list(read_attributes(attribute_path(root / "documents" / s, "dedup"))) for s in ("a.jsonl.gz",
                                                                                              "b.jsonl.gz")]

    real_replace = os.replace
    renames = []
    corpus(tmp_path / "reference")
    monkeypatch.setattr(os, "replace", lambda x, y: renames.append(y) or real_replace(x, y))
    dedup(tmp_path / "reference")
    monkeypatch.setattr(os, "replace", real_replace)
    expected = outcome(tmp_path / "reference")
    assert any(row[1]["dedup__duplicate_substrings"] for rows in expected for row in rows)
    assert any(row[1]["dedup__near_duplicate"] for rows in expected for row in rows)
    assert len(renames) == 11  # fingerprints, attributes of 2 shards (both rewritten), the state (3), config, manifest
    for k in range(len(renames)):
        root = tmp_path / f"kill{k}"
        corpus(root)
        done = []

        def replace(x, y, done=done, k=k):
            if len(done) == k:
                raise KeyboardInterrupt
            done.append(y)
            return real_replace(x, y)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            dedup(root)
        monkeypatch.setattr(os, "replace", real_replace)
        dedup(root)
        assert outcome(root) == expected, (k, done)


@pytest.mark.slow
def test_minhash_on_ray_matches_local(tmp_path):
    pytest.importorskip("ray")
    rng = random.Random(6)
    a, b, c = _chain(rng)
    for run in ("local", "ray"):
        _write(tmp_path / run / "documents" / "x.jsonl.gz", [{"id": "c", "text": c}, {"id": "a", "text": a}])
        _write(tmp_path / run / "documents" / "y.jsonl.gz", [{"id": "b", "text": b}])
        run_dedup(DedupConfig(documents=[str(tmp_path / run / "documents" / "*.gz")], modes=["minhash"],
                              executor=ExecutorConfig(kind=run, workers=2, progress=False)))
    local = [_rows(tmp_path / "local", s) for s in ("x.jsonl.gz", "y.jsonl.gz")]
    assert local[1]["b"]["dedup__near_duplicate"] and local == [_rows(tmp_path / "ray", s)
                                                               for s in ("x.jsonl.gz", "y.jsonl.gz")]
