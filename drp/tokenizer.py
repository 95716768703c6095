r"""CLIP's byte-level BPE tokenizer: the first step of Stable Diffusion 1.x, prompt -> 77 token ids.

SD 1.x conditions its UNet on the hidden states of OpenAI's CLIP ViT-L/14 text encoder, and that
encoder reads exactly 77 token ids: `<|startoftext|>`, the prompt's ids, `<|endoftext|>`, then
padding. This file turns text into those ids in four steps, each explained where it is written:

    1. clean up     "A  Café,\t(Cat:1.2)"   -> "a café, (cat:1.2)"     `clean_text`
    2. split        -> "a" "café" "," "(" "cat" ":" "1" "." "2" ")"    `split_words`
    3. bytes        -> "café" is written as its UTF-8 bytes, shown "cafÃ©"  `bytes_to_unicode`
    4. merge (BPE)  -> learned merges join them: "cafÃ©</w>", id 15304      `Tokenizer.bpe`

It follows openai/CLIP `clip/simple_tokenizer.py` (the tokenizer CLIP was trained with) and matches,
id for id, `transformers.CLIPTokenizer` as SD 1.x uses it (CompVis/stable-diffusion
`ldm/modules/encoders/modules.py`, `FrozenCLIPEmbedder`: padding="max_length", max_length=77,
truncation=True, pad = `<|endoftext|>`). Where those two disagree we follow transformers, since
that is what SD was run with; each such place says so. The vocabulary file
`bpe_simple_vocab_16e6.txt.gz` is CLIP's own (shipped in `weights/`).
"""

import gzip
import itertools
import re
import unicodedata
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from .errors import DrpError

DEFAULT_VOCAB = Path(__file__).resolve().parent.parent / "weights" / "bpe_simple_vocab_16e6.txt.gz"

# CLIP's text encoder has 77 position embeddings, so every prompt becomes 77 ids:
# BOS + up to 75 prompt tokens + EOS, padded. SD 1.x pads with the EOS id (49407), not 0.
CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# CLIP was trained with a vocabulary of 49152 ids counting its 256 byte tokens and 2 special
# tokens, which leaves 49152 - 256 - 2 = 48894 merges. The vocabulary then also holds each byte
# with the end-of-word mark `</w>` (256 more), so: 256 + 256 + 48894 + 2 = 49408 ids.
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """A one-to-one map from the 256 byte values to 256 printable characters.

    BPE works on strings, but it should work on *bytes*: then any text at all (accents, CJK, emoji)
    is a sequence of 256 base symbols, and no character is ever "unknown". So each character is
    first written as its UTF-8 bytes, and each byte is given a stand-in character. The merges file
    is plain text with a space between the two halves of a merge, so the stand-ins must be visible
    characters that are not whitespace:

      - the 188 bytes that already are such characters in Latin-1 stand for themselves:
        33..126 ('!'..'~'), 161..172 ('¡'..'¬') and 174..255 ('®'..'ÿ');
      - the other 68 (control codes 0..32 including space, 127..160, and 173, the soft hyphen)
        are moved, in order, to the characters 256, 257, ... (space, byte 32, becomes 'Ġ').

    The order of this dict is the order of the vocabulary's first 256 ids: '!' is id 0.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    moved = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return table


def is_whitespace(ch: str) -> bool:
    r"""Unicode's White_Space property, as the regex engine behind transformers' tokenizer reads `\s`.

    Python's `str.isspace` also counts the four ASCII separators 0x1C..0x1F; transformers keeps them
    as ordinary symbols, and so do we.
    """
    return ch.isspace() and ch not in "\x1c\x1d\x1e\x1f"


def clean_text(text: str) -> str:
    """Normalise a prompt: Unicode NFC, every whitespace run -> one space, lower case.

    NFC makes "é" typed as `e` + combining accent the same single character as a precomposed "é".
    Lower-casing is done one character at a time, as transformers does: Python's `str.lower` would
    turn a word-final 'Σ' into 'ς', transformers gives 'σ'. Leading/trailing spaces need no strip:
    the split below drops all whitespace. Two cleanups of the original CLIP are left out, as in
    transformers' tokenizer for SD: `ftfy.fix_text` (repairs mojibake) and `html.unescape` (so
    "&amp;" stays the five characters "&amp;"). Letters added to Unicode after the version Python
    was built with (`unicodedata.unidata_version`) may lower-case differently from transformers.
    """
    text = unicodedata.normalize("NFC", text)
    text = re.sub(" +", " ", "".join(" " if is_whitespace(c) else c for c in text))
    return "".join(c.lower() for c in text)


def _kind(ch: str) -> str:
    """'L' for letters, 'N' for numbers, ' ' for whitespace, '?' for everything else."""
    if is_whitespace(ch):
        return " "
    category = unicodedata.category(ch)[0]  # e.g. "Ll" lower-case letter, "Nd" decimal digit
    return category if category in "LN" else "?"


CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def split_words(text: str) -> Iterator[str]:
    r"""Cut cleaned text into the words that BPE sees, by CLIP's rule.

    CLIP's rule is a regular expression whose alternatives are tried in order at each position:

        <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+

    piece by piece:
      - `<|startoftext|>`, `<|endoftext|>`: the special tokens as one piece (see below);
      - `'s 't 're 've 'm 'll 'd`: English contractions become their own word: "it's" -> "it" "'s";
      - `[\p{L}]+`: a run of letters of any script (Unicode categories L*): "café", "東京";
      - `[\p{N}]`: ONE number character (categories N*), so "1024" -> "1" "0" "2" "4";
      - `[^\s\p{L}\p{N}]+`: a run of anything else but whitespace: "(", ":", "!!", "😀";
      - whitespace matches nothing, so it is dropped: BPE never sees a space. Word ends are
        marked instead by `</w>` on a word's last symbol.
    Python's `re` has no `\p{L}`, so this is a scan over Unicode categories.

    A special token that only appears after lower-casing ("<|EndOfText|>"; the exact spelling was
    already taken out by `Tokenizer._pieces`) is cut into "<|", "endoftext", "|>" by transformers'
    byte-level step, which splits letters from symbols again; we do the same. (Original CLIP
    would read it as the special token.)
    """
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        special = next((s for s in (BOS, EOS) if text.startswith(s, i)), None)
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if special:
            yield from ("<|", special[2:-2], "|>")
            i += len(special)
        elif contraction:
            yield contraction
            i += len(contraction)
        elif _kind(ch) == "L":
            j = i + 1
            while j < n and _kind(text[j]) == "L":
                j += 1
            yield text[i:j]
            i = j
        elif _kind(ch) == "N":
            yield ch
            i += 1
        elif _kind(ch) == "?":
            j = i + 1  # the run swallows apostrophes too: "!'s" -> "!'" "s"
            while j < n and _kind(text[j]) == "?":
                j += 1
            yield text[i:j]
            i = j
        else:  # whitespace
            i += 1


class Tokenizer:
    """CLIP's BPE tokenizer: prompts -> (B, 77) token ids, as Stable Diffusion 1.x feeds its text encoder."""

    def __init__(self, path: Optional[Union[str, Path]] = None):
        path = Path(path) if path is not None else DEFAULT_VOCAB
        if not path.is_file():
            raise DrpError(
                f"CLIP's vocabulary file was not found at {path}; "
                "restore weights/bpe_simple_vocab_16e6.txt.gz from the repository or pass its path."
            )
        # line 0 is a header ("#version: 0.2"); each merge line is "left right", e.g. "i n". The file
        # holds 262,144 merges, of which CLIP learned with the first 48,894: only those are read.
        with gzip.open(path, "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in itertools.islice(f, 1, 1 + NUM_MERGES)]

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        base = list(self.byte_encoder.values())
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
        self.encoder = {token: i for i, token in enumerate(vocab)}  # 49408 entries
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # lower rank = merged first
        self.bos_id, self.eos_id = self.encoder[BOS], self.encoder[EOS]  # 49406, 49407
        self.pad_id = self.eos_id  # SD 1.x pads with <|endoftext|>
        self.cache: dict[str, tuple[int, ...]] = {}  # word -> ids; prompts repeat words a lot

    def bpe(self, word: str) -> tuple[int, ...]:
        """The ids of one word (a piece from `split_words`), by byte-pair merging; memoised."""
        if word in self.cache:
            return self.cache[word]
        symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"  # the end-of-word mark: "cat" at the end of a word is not "cat" in "cats"
        while len(symbols) > 1:
            # merge the adjacent pair that was learned earliest, everywhere it occurs, then repeat
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break  # no learned merge applies any more
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = tuple(self.encoder[s] for s in symbols)
        self.cache[word] = ids
        return ids

    def _pieces(self, text: str) -> Iterator[str]:
        """The words of a prompt, with special tokens typed verbatim kept whole.

        Like transformers, an exact `<|startoftext|>` or `<|endoftext|>` in the raw prompt is the
        special token itself; the text between them is cleaned and split on its own.
        """
        while text:
            hits = [(text.find(s), s) for s in (BOS, EOS) if s in text]
            at, special = min(hits) if hits else (len(text), None)
            yield from split_words(clean_text(text[:at]))
            if special is None:
                return
            yield special
            text = text[at + len(special) :]

    def _word_ids(self, piece: str) -> tuple[int, ...]:
        return (self.encoder[piece],) if piece in (BOS, EOS) else self.bpe(piece)

    def encode(self, text: str) -> list[int]:
        """The token ids of a prompt, without BOS/EOS and without truncation."""
        return [i for piece in self._pieces(text) for i in self._word_ids(piece)]

    def truncated_words(self, text: str) -> list[str]:
        """The words that do not fit in the 75 prompt tokens (a word cut in the middle counts whole)."""
        room, used, dropped = CONTEXT_LENGTH - 2, 0, []
        for piece in self._pieces(text):
            used += len(self._word_ids(piece))
            if used > room:
                dropped.append(piece)
        return dropped

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Prompts -> LongTensor (B, 77): BOS, ids (at most 75, EOS kept last), EOS, EOS padding."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(text, str) for text in texts):
            raise DrpError("prompts must be strings (one str or a list of str); convert them with str() first.")
        rows = []
        for text in texts:
            ids = [self.bos_id, *self.encode(text)[: CONTEXT_LENGTH - 2], self.eos_id]
            rows.append(ids + [self.pad_id] * (CONTEXT_LENGTH - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # (B, 77)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (lower case, words separated by spaces); BOS, EOS and padding are skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if i in (self.bos_id, self.eos_id):
                continue
            token = self.decoder[i]
            end_of_word = token.endswith("</w>")
            out += bytes(self.byte_decoder[c] for c in token.removesuffix("</w>"))
            out += b" " if end_of_word else b""
        return out.decode("utf-8", errors="replace").strip()
