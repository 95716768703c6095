"""The tokenizer gives the same ids as transformers' CLIPTokenizer set up as SD 1.5's, on a varied corpus."""

import gzip
import itertools
import json

import pytest
import torch

from drp.errors import DrpError
from drp.tokenizer import DEFAULT_VOCAB, NUM_MERGES, Tokenizer, bytes_to_unicode, clean_text, split_words

LONG = (
    "masterpiece, best quality, ultra detailed, 8k, photorealistic portrait of a young woman with long "
    "flowing red hair, freckles, green eyes, wearing an ornate victorian dress, standing in a sunlit "
    "garden full of roses and lilies, soft bokeh background, golden hour lighting, cinematic composition, "
    "shot on canon eos r5, 85mm f/1.4 lens, sharp focus, intricate lace details, by greg rutkowski and "
    "alphonse mucha, trending on artstation, award winning photograph"
)

HAND_WRITTEN = [
    # plain prompts
    "a photo of a cat",
    "A Photo Of A Cat",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a fox in a snowy forest",
    "portrait of an old man, oil on canvas, rembrandt lighting",
    "isometric voxel art of a tiny island",
    "cyberpunk city at night, neon signs, rain, reflections",
    "the quick brown fox jumps over the lazy dog",
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaa aaaaaaaa bbbbbb zzzzzzzzzzzz",
    "a",
    "x",
    # punctuation
    "hello, world!",
    "wait... what?!",
    "a cat; a dog: a bird.",
    "sunset -- over the sea",
    "well-known, state-of-the-art, high-quality",
    "email@example.com https://example.org/path?x=1&y=2",
    '"quoted text" and \'single quotes\'',
    "#hashtag @mention $100 50% ^caret ~tilde `backtick`",
    "a/b\\c|d",
    "!!!???...,,,",
    "(((((",
    "__init__ snake_case camelCase PascalCase",
    "--no-border ++ ** // == !=",
    # emphasis syntax of web UIs, tokenized literally
    "(masterpiece:1.2), best quality",
    "((highly detailed)), [blurry], [[low quality]]",
    "a (red:1.5) car and a [blue] house",
    "(word:0.8) [word:1.1] {word} <lora:style:0.7>",
    "(cat:1.2) (dog:-1) (bird:.5)",
    "[cat|dog] [from:to:0.5]",
    "a BREAK b AND c",
    # contractions
    "it's don't we're I've I'm you'll he'd",
    "IT'S DON'T WE'RE I'VE I'M YOU'LL HE'D",
    "It's a dog's life, isn't it?",
    "she'd've y'all ma'am rock'n'roll",
    "'s 't 're 've 'm 'll 'd",
    "''s '''t \"'re\" ('ve) !'m",
    "the cats' toys",
    "o'clock O'Neill d'artagnan l'amour",
    "it’s curly apostrophe’s",
    # digits
    "1024x768",
    "3.14",
    "2024",
    "a 4k wallpaper, 1920x1080, 60fps",
    "version 1.2.3-beta.4",
    "+1 -1 1e-5 0x1F 007",
    "1,000,000 dollars",
    "year 1999 and 2000",
    "½ ¼ ² ³ ⅻ Ⅻ ① ٣ ३ 五",
    "x² + y² = z²",
    # accents, composed and decomposed
    "café naïve",
    "cafe\u0301 nai\u0308ve",
    "CAFÉ NAÏVE",
    "CAFE\u0301 NAI\u0308VE",
    "résumé, façade, jalapeño, über, smørrebrød",
    "Ångström Œuvre Straße ß",
    "ﬁ ﬂ ligatures",
    "Zoë Brontë coöperate",
    "n\u0303 vs ñ",
    "\u0301 leading combining accent",
    # other scripts
    "東京タワーの夜景",
    "一只可爱的猫",
    "한국어 텍스트",
    "日本語とEnglishの混在",
    "Привет, мир! Красная площадь",
    "ПРИВЕТ МИР",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "Γειά σου Κόσμε ΟΔΟΣ",
    "ΣΊΣΥΦΟΣ",
    "İstanbul ıspanak",
    "ไทย ภาษา",
    "Ελληνικά and English",
    # emoji and symbols
    "a cat 😺 with a hat 🎩",
    "🔥🔥🔥 fire",
    "👍🏽 thumbs up",
    "👨‍👩‍👧‍👦 family",
    "🇫🇷 flag",
    "★☆♥♦ symbols ©®™ €£¥",
    "→ ← ↑ ↓ ∞ ≠ ≤ ≥",
    "♪ music ♫",
    # HTML entities stay text
    "&amp; &lt; &gt; &quot; &#39;",
    "salt &amp; pepper",
    "Tom &amp; Jerry &lt;3",
    "&nbsp;&nbsp;spaces",
    # whitespace
    "a\tcat",
    "a\ncat\non\nlines",
    "a    cat     with   spaces",
    "   leading and trailing   ",
    "\t\n mixed \r\n whitespace \t",
    "a\u00a0non\u2003breaking\u3000spaces",
    "zero\u200bwidth\u200bspace",
    "info\x1cseparator\x1fchars",
    "ctrl\x00\x01\x7f chars",
    "soft\u00adhyphen",
    # special tokens typed into the prompt
    "a <|endoftext|> b",
    "<|startoftext|>hello<|endoftext|>",
    "<|ENDOFTEXT|>!!",
    "!<|endoftext|>",
    "<|endoftext|",
    "<|endoftext|>\u0338",
    # empty and whitespace only
    "",
    " ",
    "\t\n  \r",
    # long prompts (truncated to 75 tokens)
    LONG,
    LONG.upper(),
    "a " * 100,
    "1" * 120,
    "word, " * 60,
    "😀" * 40,
    "東京" * 50,
    "(" * 200,
    "supercalifragilisticexpialidocious " * 10,
]

SUBJECTS = ["a cat", "An Astronaut", "the café", "Два кота", "一只狗", "robot 42", "it's me"]
STYLES = ["(oil painting:1.3)", "[sketch]", "8k, hdr", "by Greg Rutkowski", "&amp; friends", "😀\t\tneon"]
PLACES = ["on Mars", "in 2077", "at 3.5 AU", "under the sea!!", "\nin  PARIS"]
CORPUS = HAND_WRITTEN + [f"{s} {st} {p}" for s, st, p in itertools.product(SUBJECTS, STYLES, PLACES)]


@pytest.fixture(scope="module")
def ours():
    return Tokenizer()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CLIPTokenizer as SD 1.5 sets it up, built from the same merges file."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip_tokenizer")
    with gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 1 + NUM_MERGES]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")


def test_corpus_is_large_and_holds_prompts_past_77_tokens(ours):
    assert len(CORPUS) >= 200
    assert sum(len(ours.encode(text)) > 75 for text in CORPUS) >= 5


def test_well_known_prompt_gives_clips_ids(ours):
    # the ids every SD 1.x user has seen in a debugger: "a photo of a cat"
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert len(ours.encoder) == 49408
    assert (ours.bos_id, ours.eos_id, ours.encoder["!"], ours.encoder["a</w>"]) == (49406, 49407, 0, 320)


def test_batch_equals_transformers_padded_and_truncated_to_77(ours, reference):
    expected = reference(CORPUS, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours(CORPUS)
    assert got.dtype == torch.long and got.shape == (len(CORPUS), 77)
    for text, row, want in zip(CORPUS, got.tolist(), expected):
        assert row == want, repr(text)


def test_encode_equals_transformers_ids_without_bos_and_eos(ours, reference):
    for text in CORPUS:
        assert ours.encode(text) == reference(text, add_special_tokens=False).input_ids, repr(text)


def test_cleanup_equals_transformers_normalizer(reference):
    normalizer = reference.backend_tokenizer.normalizer
    for text in CORPUS:
        assert clean_text(text) == normalizer.normalize_str(text), repr(text)


def test_composed_and_decomposed_accents_give_the_same_ids(ours):
    assert ours.encode("cafe\u0301 nai\u0308ve") == ours.encode("café naïve")
    assert ours.encode("café") != ours.encode("cafe")


def test_split_rule_cuts_contractions_digits_and_symbol_runs():
    text = clean_text("It's (CAT:1.25), 1024x768!! 東京 😀😀")
    assert list(split_words(text)) == [
        "it", "'s", "(", "cat", ":", "1", ".", "2", "5", "),", "1", "0", "2", "4", "x", "7", "6", "8", "!!",
        "東京", "😀😀",
    ]


def test_long_prompt_keeps_eos_at_position_76(ours):
    row = ours(LONG)[0]
    assert len(ours.encode(LONG)) > 75
    assert row[0].item() == 49406 and row[76].item() == 49407
    assert row[1:76].tolist() == ours.encode(LONG)[:75]
    assert 49407 not in row[:76].tolist()


def test_short_prompt_is_padded_with_eos_id(ours):
    row = ours(["a photo of a cat"])[0].tolist()
    assert row[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert row[7:] == [49407] * 70


def test_single_string_and_empty_prompt_give_a_batch_of_one(ours):
    assert ours("a cat").shape == (1, 77)
    assert ours("").tolist() == [[49406] + [49407] * 76]
    assert ours(" \t\n ").tolist() == [[49406] + [49407] * 76]


def test_truncated_words_lists_what_does_not_fit_in_75_tokens(ours):
    assert ours.truncated_words("a photo of a cat") == []
    assert ours.truncated_words("a " * 75) == []
    assert ours.truncated_words("a " * 75 + "big red dog") == ["big", "red", "dog"]
    # "supercalifragilisticexpialidocious" is several tokens; a word cut in the middle counts whole
    word = "supercalifragilisticexpialidocious"
    assert len(ours.encode(word)) > 1
    assert ours.truncated_words("a " * 74 + word + " end") == [word, "end"]


def test_bpe_results_are_memoised_per_word(ours):
    ours.cache.clear()
    ours.encode("a zebra and a zebra")
    assert set(ours.cache) == {"a", "zebra", "and"}
    ours.cache["zebra"] = (7, 7)  # a poisoned entry is returned as is, so the memo is really read
    try:
        assert ours.encode("zebra") == [7, 7]
    finally:
        ours.cache.clear()
    assert ours.encode("zebra") != [7, 7]


def test_decode_gives_back_the_cleaned_prompt(ours):
    assert ours.decode(ours("A  Photo of a CAFÉ 😀")[0]) == "a photo of a café 😀"
    assert ours.decode(ours.encode("it's 1024")) == "it 's 1 0 2 4"


def test_bytes_to_unicode_is_a_bijection_onto_non_space_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


def test_a_prompt_that_is_not_a_string_raises_drp_error(ours):
    with pytest.raises(DrpError, match="strings"):
        ours(["a cat", None])


def test_missing_vocabulary_file_raises_drp_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "bpe.txt.gz"
    with pytest.raises(DrpError, match="nowhere"):
        Tokenizer(missing)
