"""Taggers against hand-computed values on crafted documents."""

import textwrap

import pytest

from lmforge.core.errors import LmforgeError
from lmforge.curation import taggers
from lmforge.curation.taggers import gopher
from lmforge.curation.taggers.c4 import c4_attributes
from lmforge.curation.taggers.pii import find_emails, find_ips, find_phones

GOPHER_DOC = "the cat sat\nthe cat sat\n# hello...\n- item one"


@pytest.fixture(params=["python", "numpy"])
def ngram_path(request, monkeypatch):
    """Run each Gopher test through both n-gram implementations (short docs use pure Python)."""
    monkeypatch.setattr(gopher, "SMALL_DOC_WORDS", 10_000 if request.param == "python" else 0)


def test_gopher_rules_hand_computed(ngram_path):
    v = gopher.gopher_values(GOPHER_DOC)
    # words: the cat sat the cat sat # hello... - item one  (11 words, 35 characters)
    assert v["word_count"] == 11
    assert v["character_count"] == len(GOPHER_DOC)
    assert v["mean_word_length"] == pytest.approx(35 / 11)
    assert v["median_word_length"] == 3
    assert v["symbol_to_word_ratio"] == pytest.approx(2 / 11)  # one '#', one '...'
    assert v["fraction_of_words_with_alpha_character"] == pytest.approx(9 / 11)  # '#' and '-' have no letter
    assert v["required_word_count"] == 2  # 'the' twice
    assert v["fraction_of_lines_starting_with_bullet_point"] == pytest.approx(1 / 4)
    assert v["fraction_of_lines_ending_with_ellipsis"] == pytest.approx(1 / 4)
    assert v["fraction_of_duplicate_lines"] == pytest.approx(2 / 4)
    assert v["fraction_of_characters_in_duplicate_lines"] == pytest.approx(22 / 42)
    assert v["fraction_of_duplicate_paragraphs"] == 0
    assert v["fraction_of_characters_in_most_common_2grams"] == pytest.approx(2 * 6 / 35)  # 'the cat' x2
    assert v["fraction_of_characters_in_most_common_3grams"] == pytest.approx(2 * 9 / 35)  # 'the cat sat' x2
    assert v["fraction_of_characters_in_most_common_4grams"] == pytest.approx(12 / 35)  # all unique: the first
    for n in range(5, 11):
        assert v[f"fraction_of_characters_in_duplicate_{n}grams"] == 0


def test_gopher_duplicate_ngrams_count_overlapping_characters_once(ngram_path):
    v = gopher.gopher_values("x a b c d e a b c d e y")
    # 'a b c d e' occurs twice: words 1..10 are covered (10 of 12 characters); no 6-gram repeats
    assert v["fraction_of_characters_in_duplicate_5grams"] == pytest.approx(10 / 12)
    assert v["fraction_of_characters_in_duplicate_6grams"] == 0
    v = gopher.gopher_values("aa " * 12)
    # every n-gram is 'aa aa ...': all 24 characters covered once although the 5-grams overlap
    assert v["fraction_of_characters_in_duplicate_5grams"] == pytest.approx(1.0)
    assert v["fraction_of_characters_in_most_common_2grams"] == pytest.approx(11 * 4 / 24)


def test_gopher_paragraphs_and_blank_lines(ngram_path):
    text = "First para line.\n\n\nSecond one.\n\nFirst para line.\n"
    v = gopher.gopher_values(text)
    assert v["fraction_of_duplicate_lines"] == pytest.approx(2 / 3)  # blank lines are not lines
    assert v["fraction_of_duplicate_paragraphs"] == pytest.approx(2 / 3)
    assert v["fraction_of_characters_in_duplicate_paragraphs"] == pytest.approx(32 / 43)
    assert gopher.gopher_values("")["word_count"] == 0


def test_gopher_paths_agree_on_random_documents():
    import random

    import numpy as np

    rng = random.Random(0)
    for _ in range(200):
        words = [rng.choice(["a", "bb", "the", "ccc", "of"]) for _ in range(rng.randint(1, 150))]
        lens = [len(w) for w in words]
        small = gopher._ngram_values_small(words, lens, sum(lens))
        vectorised = gopher._ngram_values_numpy(gopher._hashed(words)[0], np.array(lens), sum(lens))
        assert small == pytest.approx(vectorised)


def test_c4_rules_hand_computed():
    text = ("Hello world this is fine.\nshort line\nThis line has javascript in it for sure.\n"
            "lorem ipsum dolor sit amet.\n{ curly")
    a = c4_attributes(text)
    assert a["lines_with_no_ending_punctuation"] == [[26, 37, 1.0], [106, 113, 1.0]]
    assert a["lines_with_too_few_words"] == [[26, 37, 1.0], [106, 113, 1.0]]
    assert a["lines_with_javascript"] == [[37, 78, 1.0]]
    assert a["has_lorem_ipsum"] == [[0, 113, 1.0]]
    assert a["has_curly_brace"] == [[0, 113, 1.0]]
    assert a["has_naughty_word"] == []
    assert a["sentence_count"] == [[0, 113, 2.0]]  # lines 1 and 4 survive, one sentence each
    assert a["line_count"] == [[0, 113, 5.0]]
    four_words = c4_attributes("one two three four.\none two three four five.")
    assert four_words["lines_with_too_few_words"] == [[0, 20, 1.0]]  # C4: at least 5 words
    assert c4_attributes('He said "stop."\nWell!\nReally?\n')["lines_with_no_ending_punctuation"] == [[30, 30, 1.0]]


def test_c4_bad_words_use_word_boundaries():
    assert c4_attributes("What the fuck.")["has_naughty_word"]
    assert c4_attributes("He watched 2 girls 1 cup, sadly.")["has_naughty_word"]
    assert not c4_attributes("Scunthorpe is a town.")["has_naughty_word"]


@pytest.mark.parametrize("text,expected", [
    ("contact john.doe@example.com today", "john.doe@example.com"),
    ("mail: a_b+tag@mail.co.uk.", "a_b+tag@mail.co.uk"),
])
def test_email_positive(text, expected):
    spans = find_emails(text)
    assert [text[s:e] for s, e, _ in spans] == [expected]


@pytest.mark.parametrize("text", ["user@localhost", "foo@bar", "no at sign here", "@handle on social"])
def test_email_negative(text):
    assert find_emails(text) == []


@pytest.mark.parametrize("text,expected", [
    ("call (555) 123-4567 now", "(555) 123-4567"),
    ("call 555-123-4567.", "555-123-4567"),
    ("tel +1 555.123.4567", "+1 555.123.4567"),
    ("London +44 20 7946 0958", "+44 20 7946 0958"),
])
def test_phone_positive(text, expected):
    assert [text[s:e] for s, e, _ in find_phones(text)] == [expected]


@pytest.mark.parametrize("text", ["12345", "year 2021-2022", "ISBN 555-123-4567", "pi is 3.14159265",
                                  "id 5551234567890123456"])
def test_phone_negative(text):
    assert find_phones(text) == []


@pytest.mark.parametrize("text,expected", [
    ("server at 192.168.1.1.", ["192.168.1.1"]),
    ("ips 10.0.0.1 and 255.255.255.255", ["10.0.0.1", "255.255.255.255"]),
    ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 here", ["2001:0db8:85a3:0000:0000:8a2e:0370:7334"]),
])
def test_ip_positive(text, expected):
    assert [text[s:e] for s, e, _ in find_ips(text)] == expected


@pytest.mark.parametrize("text", ["999.1.1.1", "1.2.3", "version 1.2.3.4.5", "doi 10.1000.182.1"])
def test_ip_negative(text):
    assert find_ips(text) == []


def test_pii_tagger_counts():
    out = taggers.make_tagger("pii").tag({"id": "1", "text": "a@b.com c@d.org 10.0.0.1"})
    assert out["doc_count"] == [[0, 24, 3.0]]


def test_langid_document_and_paragraph():
    pytest.importorskip("fasttext")
    text = "The quick brown fox jumps over the lazy dog and runs into the forest.\n" \
           "Le renard brun rapide saute par-dessus le chien paresseux et court dans la forêt."
    doc = taggers.make_tagger("langid").tag({"id": "1", "text": text.split("\n")[0]})
    assert doc["en"][0][2] > 0.5
    para = taggers.make_tagger("langid_paragraph").tag({"id": "1", "text": text})
    assert para["en"][0][:2] == [0, 70] and para["fr"][0][:2] == [70, len(text)]
    assert 0 < para["doc_en"][0][2] < 1


def test_fasttext_classifier_tagger_with_lid176():
    pytest.importorskip("fasttext")
    from lmforge.curation.taggers.language import lid176_path

    tagger = taggers.make_tagger("fasttext", {"model": str(lid176_path()), "k": "1"})
    out = tagger.tag({"id": "1", "text": "Dies ist ein ganz normaler deutscher Satz über das Wetter."})
    assert list(out) == ["de"]
    with pytest.raises(LmforgeError, match="needs a model"):
        taggers.make_tagger("fasttext")


def test_repetition_and_code_taggers():
    rep = taggers.make_tagger("repetition").tag({"id": "1", "text": "ab" * 6 + "\nline\nline\n" + "=" * 12})
    assert rep["repeated_sequence"][0] == [0, 12, 6.0]
    assert rep["duplicate_lines"] == [[18, 23, 1.0]]
    assert rep["doc_max_repeats"][0][2] == 12.0
    code = taggers.make_tagger("code").tag({"id": "1", "text": "# Code generated by protoc. DO NOT EDIT.\nx = 1\n"})
    assert code["autogenerated"][0][2] == 1.0
    assert code["max_line_length"][0][2] == 40.0


def test_unknown_tagger_lists_available():
    with pytest.raises(LmforgeError, match=r"unknown tagger 'gopehr'; available taggers: .*c4.*gopher"):
        taggers.make_tagger("gopehr")


def test_user_tagger_module(tmp_path):
    module = tmp_path / "my_taggers.py"
    module.write_text(textwrap.dedent("""
        from lmforge.curation.taggers import Tagger, register_tagger

        @register_tagger("shouting_test")
        class Shouting(Tagger):
            attributes = ("upper_fraction",)

            def tag(self, doc):
                text = doc["text"]
                return {"upper_fraction": [[0, len(text), sum(c.isupper() for c in text) / len(text)]]}
    """))
    taggers.load_tagger_modules([str(module)])
    assert taggers.make_tagger("shouting_test").tag({"id": "1", "text": "ABcd"}) == {"upper_fraction": [[0, 4, 0.5]]}
    with pytest.raises(LmforgeError, match="tagger module not found"):
        taggers.load_tagger_modules([str(tmp_path / "missing.py")])
