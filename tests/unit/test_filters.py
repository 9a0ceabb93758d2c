"""Tests for data_prep.filters: normalization, words, and each filter on hand-made English and
French documents that must pass, and spam that must be dropped with the expected reason."""

import random
import subprocess
import sys
import unicodedata

import pytest

from data_prep.filters import (
    _SPACES,
    STOP_WORDS,
    LengthFilter,
    QualityFilter,
    RepetitionFilter,
    build_filter,
    first_rejection,
    normalize,
    split_words,
)

EN = (
    "The river that runs through the old town has been a source of water, food and trade for more "
    "than a thousand years. In the spring, when the snow melts in the mountains, the water rises "
    "quickly and the farmers who live along its banks move their animals to higher ground. "
    "Historians have found records of great floods in the archives of the town hall, together with "
    "letters written by merchants who complained that the boats could not reach the harbour for "
    "weeks at a time."
)
# French typography on purpose: no-break spaces before ":", "!", "?" and inside « ».
FR = (
    "La rivière qui traverse la vieille ville a été, pendant plus de mille ans, une "
    "source d'eau, de nourriture et de commerce. Au printemps, lorsque la neige fond dans les "
    "montagnes, l'eau monte rapidement et les paysans qui vivent sur ses rives conduisent "
    "leurs bêtes vers les hauteurs. Les historiens ont retrouvé dans les archives de la "
    "mairie le récit de grandes crues, ainsi que des lettres de marchands qui se "
    "plaignaient\u00a0: «\u00a0les bateaux ne peuvent plus atteindre le port\u00a0!\u00a0» Qu'en "
    "pensait-on à l'époque\u202f? Personne ne le sait."
)
DE = (
    "Der Fluss, der durch die Altstadt fließt, war mehr als tausend Jahre lang eine Quelle "
    "für Wasser, Nahrung und Handel. Im Frühling, wenn in den Bergen der Schnee "
    "schmilzt, steigt das Wasser schnell an, und die Bauern, die an seinen Ufern leben, "
    "treiben ihre Tiere auf höher gelegene Weiden. Historiker haben im Archiv des Rathauses "
    "Berichte über große Überschwemmungen gefunden, dazu Briefe von Kaufleuten, die "
    "sich beklagten, dass die Schiffe den Hafen wochenlang nicht erreichen konnten."
)
ES = (
    "El río que atraviesa el casco antiguo ha sido durante más de mil años una fuente "
    "de agua, de alimento y de comercio. En primavera, cuando la nieve se derrite en las "
    "montañas, el agua sube con rapidez y los campesinos que viven en sus orillas llevan a "
    "sus animales a tierras más altas. Los historiadores han encontrado en los archivos del "
    "ayuntamiento relatos de grandes inundaciones, junto con cartas de comerciantes que se "
    "quejaban de que los barcos no podían llegar al puerto durante semanas."
)


def random_words(n, seed, vocabulary=300):
    """n words drawn from a made-up vocabulary of distinct 4-8 letter words (no stop words)."""
    rng = random.Random(seed)
    letters = "bcdfghjkmpqrvwxz"  # no vowels: cannot spell a stop word by accident
    vocab = [
        "".join(rng.choice(letters) for _ in range(rng.randint(4, 8))) for _ in range(vocabulary)
    ]
    return [rng.choice(vocab) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# normalize


def test_normalize_nfc_controls_and_newlines():
    assert normalize("Cafe\u0301") == "Café" and len(normalize("Cafe\u0301")) == 4
    assert normalize("a\x00b\x07c\td\r\ne\rf\x0cg\u2028h") == "abc\td\ne\nf\ng\nh"
    assert normalize("in\u00adfor\u200bmation\ufeff") == "information"
    assert normalize("e\u00ad\u0301") == "é"  # the soft hyphen no longer separates the accent
    assert normalize("👩\u200d💻") == "👩\u200d💻"  # ZWJ kept


def test_normalize_whitespace():
    assert normalize("  \n\n line one  \t\nline two\t \n") == "line one\nline two"
    assert normalize("a\n\n\n\n\nb") == "a\n\nb"
    assert normalize("a\n \n\t\n\nb") == "a\n\nb"
    code = "def f(x):\n    if x:\n\treturn 1  # two  spaces"
    assert normalize(code) == code  # indentation and inner spaces are kept


def test_normalize_french_spaces_become_plain_spaces():
    assert normalize("Bonjour\u202f! «\u00a0oui\u00a0» : non\u2009;") == "Bonjour ! « oui » : non ;"
    assert "\u00a0" not in normalize(FR) and "\u202f" not in normalize(FR)


def test_normalize_handles_every_space_and_control_character():
    for cp in range(0x10000):  # all Zs and Cc characters live in the BMP
        ch, category = chr(cp), unicodedata.category(chr(cp))
        if category == "Zs" and ch != " ":
            assert ch in _SPACES, hex(cp)
        if category in ("Zs", "Cc") and ch not in "\n\t":
            assert normalize(f"a{ch}b") in ("ab", "a b", "a\nb"), hex(cp)


def test_normalize_is_idempotent():
    for text in (EN, FR, DE, ES):
        once = normalize(text)
        assert normalize(once) == once
        assert unicodedata.is_normalized("NFC", once)
    # Fuzz with the characters most likely to break idempotence: combining marks, Hangul jamo
    # (compose under NFC), singletons (Angstrom sign), every kind of space, controls, invisibles.
    alphabet = list("ae \n\t\r.") + [
        "\u0301",
        "\u0327",
        "\u1100",
        "\u1161",
        "\u212b",
        "\u00c5",
        "\x00",
    ]
    alphabet += list(_SPACES) + ["\x85", "\u2028", "\u00ad", "\u200b", "\ufeff", "\x0c", "\x1f"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        once = normalize(text)
        assert normalize(once) == once, repr(text)


# ----------------------------------------------------------------------------------------------
# words


def test_split_words_french_elisions_and_english_contractions():
    assert split_words("L'homme qu’il voit aujourd'hui, jusqu'à demain") == [
        "L'", "homme", "qu’", "il", "voit", "aujourd'hui", "jusqu'", "à", "demain",
    ]  # fmt: skip
    words = split_words("Don't panic: it's 42 (peut-être).")
    assert words == ["Don't", "panic", "it's", "42", "peut", "être"]


# ----------------------------------------------------------------------------------------------
# LengthFilter


def test_length_filter():
    f = LengthFilter(min_chars=10, max_chars=100)
    assert f.check("short") == "length:too_short"
    assert f.check("x" * 101) == "length:too_long"
    assert f.check("just right") is None


# ----------------------------------------------------------------------------------------------
# QualityFilter


@pytest.mark.parametrize("text", [EN, FR])
def test_quality_keeps_real_paragraphs(text):
    assert QualityFilter().check(normalize(text)) is None


def test_quality_drops_with_reasons():
    q = QualityFilter()
    bullets = "\n".join(f"• Buy cheap item number {i} today with free shipping" for i in range(30))
    assert q.check(bullets) == "quality:bullet_lines"
    assert q.check("#### @@@ $$$ %%% &&& *** !!! ??? ### ~~~ ^^^ " * 20) == "quality:word_count"
    hashtags = EN + " " + " ".join(f"#tag{i}" for i in range(20))
    assert q.check(hashtags) == "quality:symbol_word_ratio"
    teasers = "\n".join(
        f"Read the story number {i} about the river and the old town..." for i in range(20)
    )
    assert q.check(teasers) == "quality:ellipsis_lines"
    assert q.check(" ".join("abcdefg"[i % 7] for i in range(80))) == "quality:mean_word_length"
    table = (
        EN + "\n" + "\n".join(" ".join(str(123456 + i * j) for j in range(10)) for i in range(40))
    )
    assert q.check(table) == "quality:alpha_words"
    no_stop_words = " ".join(random_words(80, seed=1))
    assert q.check(no_stop_words) == "quality:stop_words"
    assert q.check("too few words here") == "quality:word_count"


def test_quality_stop_words_per_language():
    assert not STOP_WORDS["en"] & STOP_WORDS["fr"]
    fr_only = QualityFilter(languages=["fr"])  # a YAML list is accepted
    assert fr_only.languages == ("fr",)
    assert fr_only.check(normalize(FR)) is None
    assert fr_only.check(EN) == "quality:stop_words"
    with pytest.raises(ValueError, match="no stop-word list"):
        QualityFilter(languages=("xx",))


# ----------------------------------------------------------------------------------------------
# RepetitionFilter


@pytest.mark.parametrize("text", [EN, FR, DE, ES])
def test_repetition_keeps_real_paragraphs(text):
    assert RepetitionFilter().check(normalize(text)) is None


def test_repetition_drops_with_reasons():
    r = RepetitionFilter()
    assert r.check("Click here to subscribe to our newsletter!\n" * 50) == "repetition:dup_lines"
    # One long line repeated once among short distinct lines: few duplicate lines, many characters.
    lines = [f"line {w}" for w in random_words(10, seed=2)]
    assert r.check("\n".join([EN, *lines, EN])) == "repetition:dup_line_chars"
    # A phrase hammered between random words: its bigram covers > 20% of the characters.
    words = random_words(200, seed=3)
    spam = " ".join(w + (" click here" if i % 4 == 0 else "") for i, w in enumerate(words))
    assert r.check(spam) == "repetition:top_2gram"
    # A passage repeated inside one line: no duplicate lines or paragraphs, duplicate 5-grams.
    assert r.check(EN + " " + EN) == "repetition:dup_5gram"


def test_repetition_paragraph_rules():
    lines_off = RepetitionFilter(max_dup_line_fraction=1.0, max_dup_line_char_fraction=1.0)
    paragraphs = [" ".join(random_words(12, seed=s)) for s in range(4)]
    doubled = "\n\n".join(paragraphs + paragraphs[:2])  # 2 of 6 repeated: 33% > 30%
    assert lines_off.check(doubled) == "repetition:dup_paragraphs"
    long_paragraph = "\n".join(" ".join(random_words(30, seed=s)) for s in range(10, 14))
    assert lines_off.check("\n\n".join([long_paragraph, *paragraphs, long_paragraph])) == (
        "repetition:dup_paragraph_chars"
    )


def test_repetition_ngram_overlaps_are_counted_once():
    # "a a a a ...": the top bigram "a a" overlaps itself; its coverage is 100%, never more.
    r = RepetitionFilter(max_top_ngram_char_fraction=[[2, 0.99]], max_dup_ngram_char_fraction=[])
    assert r.max_top_ngram_char_fraction == ((2, 0.99),)
    assert r.check("aa " * 100) == "repetition:top_2gram"
    assert RepetitionFilter(max_top_ngram_char_fraction=[[2, 1.0]]).check("aa " * 100) is not None
    assert r.check(" ".join(random_words(100, seed=4, vocabulary=1000))) is None


# ----------------------------------------------------------------------------------------------
# Recipes


def test_build_filter_and_first_rejection():
    filters = [
        build_filter({"name": "length", "min_chars": 100}),
        build_filter({"name": "quality"}),
    ]
    assert isinstance(filters[0], LengthFilter) and filters[0].min_chars == 100
    assert first_rejection(filters, "tiny") == "length:too_short"
    assert first_rejection(filters, EN) is None
    with pytest.raises(ValueError, match="unknown filter"):
        build_filter({"name": "nope"})


# ----------------------------------------------------------------------------------------------
# LanguageFilter (lingua's models load once for this module: ~1 s)


@pytest.fixture(scope="module")
def language_filter():
    pytest.importorskip("lingua", reason="lingua-language-detector is not installed")
    from data_prep.filters import LanguageFilter

    return LanguageFilter(languages=("en", "fr"), min_confidence=0.65, detect_on_chars=2000)


def test_language_keeps_english_and_french(language_filter):
    assert language_filter.check(EN) is None
    assert language_filter.check(normalize(FR)) is None
    assert language_filter.detect(FR)[0] == "fr"


def test_language_drops_other_languages_with_the_language_found(language_filter):
    assert language_filter.check(DE) == "language:de"
    assert language_filter.check(ES) == "language:es"
    assert language_filter.detect("12345 !!! ###") == ("unknown", 0.0)
    assert language_filter.check("12345 !!! ###") == "language:unknown"


def test_language_low_confidence_and_shared_detector(language_filter):
    from data_prep.filters import LanguageFilter

    strict = LanguageFilter(min_confidence=1.01)
    assert strict.check(EN) == "language:en:low_confidence"
    assert strict._detector is language_filter._detector  # one detector per process
    assert "fr" in LanguageFilter(languages=("fr",), candidates=("en",)).candidates


def test_lingua_is_imported_only_when_a_language_filter_is_built():
    code = "import sys, data_prep.filters; assert 'lingua' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
