"""CLIP's BPE tokenizer for Stable Diffusion 1.5, built on the `tokenizers` library.

Gives the same ids as transformers' `CLIPTokenizer` (tests/test_tokenizer.py checks): the text is
NFC-normalised, whitespace runs become one space, everything is lowercased; CLIP's regex cuts it into
words, single digits and punctuation runs; each piece is mapped to byte-level characters and merged
by BPE, the last symbol of a word carrying the `</w>` suffix. A prompt becomes
`<|startoftext|> first-75-tokens <|endoftext|>` padded to 77 ids with `<|endoftext|>` (SD 1.x) or
`!` (id 0: SD 2.x's tokenizer, whose padding the UNet reads as part of the context).

    tok = Tokenizer.from_clip_bpe()          # or Tokenizer.from_folder("sd15/tokenizer")
    new_ids = tok.add_tokens(["<v>", "<r0_0>"])   # [49408, 49409]
    ids = tok(["a photo of <v> on the beach"])    # int64 [1, 77]
    if tok.count(prompt) > tok.max_prompt_tokens: ...   # the prompt will be cut

Added tokens are matched like transformers' `add_tokens` matches them: anywhere in the prompt, even
inside a word or next to punctuation ("<v><r0_0>", "<v>."), after the prompt is normalised, so they
are case-insensitive like the rest of the vocabulary ("<V>" is "<v>").
"""
import gzip
import importlib.util
import json
import os
import re

import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from model.errors import UserError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
# OpenAI's file holds 262,145 merges; CLIP uses the first 49152 - 256 - 2 so that the vocabulary
# (256 bytes, 256 bytes + `</w>`, one token per merge, 2 specials) has 49,408 entries.
NUM_MERGES = 49152 - 256 - 2
# CLIP's pre-tokenizer regex (OpenAI's simple_tokenizer.py), run on lowercased text.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_chars():
    """GPT-2's printable stand-in for each byte, in vocabulary order: printable latin-1 bytes keep
    their own character, the other 68 are shifted to U+0100 onwards (BPE files cannot hold spaces
    or control characters)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(shifted))]


def clip_bpe_path():
    """OpenAI's `bpe_simple_vocab_16e6.txt.gz` inside the `openai-clip` package. The package itself
    is not imported: its __init__ pulls in torchvision and pkg_resources."""
    spec = importlib.util.find_spec("clip")
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz") if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise UserError("CLIP's BPE vocabulary was not found: `pip install openai-clip`, or load a diffusers "
                        "folder that has tokenizer/vocab.json and tokenizer/merges.txt")
    return path


def clip_bpe_vocab(path=None):
    """(vocab {token: id}, merges [(left, right)]) built from OpenAI's gzipped merge list."""
    with gzip.open(path or clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:1 + NUM_MERGES]]  # line 0 is a version header
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_vocab_files(folder, bpe_path=None):
    """Write CLIP's vocabulary as the `vocab.json` + `merges.txt` pair a diffusers `tokenizer/` folder
    holds (what transformers' CLIPTokenizer and `Tokenizer.from_folder` read)."""
    vocab, merges = clip_bpe_vocab(bpe_path)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


class Tokenizer:
    """Prompts -> int64 [B, 77] ids; `add_tokens` adds new single tokens after the 49,408."""

    def __init__(self, vocab, merges, length=CONTEXT_LENGTH, pad=EOS):
        self.length = length
        self.max_prompt_tokens = length - 2  # room left by BOS and EOS
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        if pad not in vocab:
            raise UserError(f"the padding token {pad!r} is not in the vocabulary")
        self.pad_token, self.pad_id = pad, vocab[pad]
        bpe = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=EOS)
        tok = RustTokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # "removed" + invert: the regex matches are the pieces and what lies between them (spaces)
        # is dropped. ByteLevel then splits again with GPT-2's regex, as in transformers: it only
        # cuts a piece like "<|endoftext|>" written in capitals, which CLIP's regex keeps whole.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        # Registered as special (not normalised) so a literal "<|endoftext|>" in a prompt becomes that
        # one id, as in transformers.
        tok.add_special_tokens([AddedToken(BOS, special=True, normalized=False),
                                AddedToken(EOS, special=True, normalized=False)])
        if pad not in (BOS, EOS):
            # transformers makes the padding token special too: SD 2's tokenizer reads every "!" in a
            # prompt as the padding id 0, not as BPE's "!</w>" (256), and the UNet sees that id.
            tok.add_special_tokens([AddedToken(pad, special=True, normalized=False)])
        self.backend = tok
        self.vectors = {}  # multi-vector tokens: "<v>" -> "<v> <v>_1 <v>_2" wherever a prompt says "<v>"

    @classmethod
    def from_clip_bpe(cls, path=None, pad=EOS):
        """SD1.5's tokenizer from OpenAI's BPE file (the `openai-clip` package's, or `path`); SD 2's
        with pad="!"."""
        return cls(*clip_bpe_vocab(path), pad=pad)

    @classmethod
    def from_folder(cls, folder):
        """A diffusers `tokenizer/` folder: `vocab.json` + `merges.txt`, and the padding token named
        by `special_tokens_map.json` or `tokenizer_config.json` (SD 2's say "!"; none: EOS)."""
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        for path in (vocab_path, merges_path):
            if not os.path.isfile(path):
                raise UserError(f"{path} is missing: a tokenizer folder needs vocab.json and merges.txt")
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            merges = [tuple(line.split(" ")) for line in f.read().split("\n") if line and not line.startswith("#version")]
        if BOS not in vocab or EOS not in vocab:
            raise UserError(f"{vocab_path} lacks {BOS} or {EOS}: it is not a CLIP vocabulary")
        return cls(vocab, merges, pad=_pad_token(folder) or EOS)

    @property
    def vocab_size(self):
        """Rows the token-embedding table needs, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, tokens):
        """Add new tokens (e.g. "<v>", "<r0_0>"); returns their ids, one each, in order.

        A token must be new: one already in the vocabulary (or differing only in case from one,
        since matching is case-insensitive) would share its id with an existing embedding."""
        ids = []
        for token in tokens:
            if not token or any(c.isspace() for c in token):
                raise UserError(f"token {token!r} must be one word without spaces, like <v>")
            # Stored normalised: the prompt is lowercased before it is searched for added tokens.
            content = self.backend.normalizer.normalize_str(token)
            # a word of the vocabulary ("dog</w>") or a piece of one ("dog"): prompts already use its id
            if self.backend.token_to_id(content) is not None or self.backend.token_to_id(content + "</w>") is not None:
                raise UserError(f"token {token!r} is already in the vocabulary: pick a new string like <v>")
            self.backend.add_tokens([AddedToken(content, special=False, normalized=True)])
            ids.append(self.backend.token_to_id(content))
        return ids

    def add_multi_vector_token(self, token, n):
        """A token that stands for n vectors, as in textual inversion with n vectors: "<v>" and, for
        n > 1, "<v>_1" ... "<v>_{n-1}" (diffusers' names), and "<v>" in a prompt is read as all n in
        a row. Returns the n ids, in order."""
        names = [token] + [f"{token}_{k}" for k in range(1, n)]
        ids = self.add_tokens(names)
        if n > 1:
            self.vectors[token] = " ".join(names)
        return ids

    def expand(self, text):
        """The prompt with every multi-vector token written out ("<v>" -> "<v> <v>_1 <v>_2")."""
        for token, names in self.vectors.items():
            text = re.sub(re.escape(token) + r"(?!_\d)", names, text, flags=re.IGNORECASE)
        return text

    def token_ids(self, text):
        """The prompt's ids without BOS, EOS, padding or truncation."""
        return self.backend.encode(self.expand(text), add_special_tokens=False).ids

    def count(self, text):
        """How many tokens the prompt uses; above `max_prompt_tokens` the end is cut."""
        return len(self.token_ids(text))

    def decode(self, ids):
        """Ids -> text, words separated by spaces (for messages, e.g. what a cut prompt kept)."""
        return self.backend.decode(list(ids), skip_special_tokens=True).replace("</w>", " ").strip()

    def __call__(self, texts):
        """A prompt or list of prompts -> int64 [B, 77]: BOS, the first 75 tokens, EOS, then padding."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.length), self.pad_id, dtype=torch.int64)
        texts = [self.expand(t) for t in texts]
        for row, encoding in enumerate(self.backend.encode_batch(texts, add_special_tokens=False)):
            ids = [self.bos_id] + encoding.ids[:self.max_prompt_tokens] + [self.eos_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out


def _pad_token(folder):
    """The padding token a transformers tokenizer folder names, or None."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    pad = json.load(f).get("pad_token")
            except (OSError, ValueError, AttributeError):
                raise UserError(f"{path} cannot be read as JSON") from None
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad:
                return pad
    return None
