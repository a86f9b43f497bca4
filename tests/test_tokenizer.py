"""model/tokenizer.py against transformers' CLIPTokenizer (built from the same BPE file written as
vocab.json + merges.txt) and against OpenAI's own vocabulary construction."""
import importlib.util
import os
import random
import unicodedata

import pytest
import torch
from transformers import CLIPTokenizer

from model.errors import UserError
from model.tokenizer import Tokenizer, clip_bpe_path, clip_bpe_vocab, write_vocab_files

WORDS = ["a", "photo", "photograph", "of", "an", "astronaut", "riding", "horse", "dog", "on", "the", "beach",
         "sks", "oil", "painting", "by", "Greg", "Rutkowski", "HIGHLY", "Detailed", "8k", "trending", "artstation",
         "cat", "teapot", "unbelievably", "antidisestablishmentarianism", "x", "UV-mapped", "e-mail", "3D", "RGB",
         "don't", "it's", "we're", "they've", "I'm", "you'll", "he'd", "DOG'S", "Can'T", "O'Brien", "rock'n'roll",
         "café", "naïve", "Ångström", "jalapeño", "Zürich", "façade", "crème", "brûlée", "ÉCOLE", "straße",
         "東京タワー", "北京", "한국어", "日本語の文章", "Москва", "Ελληνικά", "עברית", "العربية", "हिन्दी", "ไทย",
         "🐶", "🚀", "👩‍🚀", "🇫🇷", "❤️", "😀😀😀", "☃", "™", "©", "°C", "½", "²", "٣", "①", "Ⅻ",
         "e\u0301", "A\u030a", "n\u0303o", "o\u0308\u0304", "\u0301", "\u200b", "\ufeff",
         "2024", "3.14", "1,000,000", "-42", "#1", "$5", "100%", "1st", "v1.5",
         ".", ",", "!", "?", "...", "!!!", "?!", ";", ":", "-", "--", "_", "(", ")", "[", "]", "{", "}", "\"",
         "'", "''", "'s", "'t", "'re", "`", "~", "@", "#", "$", "%", "^", "&", "*", "+", "=", "/", "\\", "|",
         "<", ">", "<>", "&amp;", "’s", "“quoted”", "«guillemets»", "—", "…"]
SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n", " \n\n ", "\r\n", "\u00a0", "\u3000", ", "]


def random_prompt(rng, n_words):
    text = ""
    for _ in range(n_words):
        word = rng.choice(WORDS)
        r = rng.random()
        word = word.upper() if r < 0.05 else word.capitalize() if r < 0.12 else word
        text += word + rng.choice(SEPARATORS)
    if rng.random() < 0.2:  # leading/trailing whitespace
        text = rng.choice(SEPARATORS) + text
    if rng.random() < 0.3:  # decomposed accents: NFC must recompose them
        text = unicodedata.normalize("NFD", text)
    return text.rstrip() if rng.random() < 0.5 else text


def prompts():
    rng = random.Random(0)
    fixed = ["", " ", "\t\n  ", "a photograph of an astronaut riding a horse", "A  PHOTOGRAPH\tof\n\nan Astronaut",
             "<|endoftext|>", "a <|startoftext|> b", "<|ENDOFTEXT|>", "caf\u00e9 cafe\u0301", " ".join(WORDS)]
    short = [random_prompt(rng, rng.randint(1, 25)) for _ in range(1000)]
    long = [random_prompt(rng, rng.randint(60, 200)) for _ in range(100)]  # far past 75 tokens
    return fixed + short + long


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip_tokenizer"))
    write_vocab_files(folder)
    return folder


def reference(files):
    return CLIPTokenizer(os.path.join(files, "vocab.json"), os.path.join(files, "merges.txt"))


def reference_ids(ref, texts):
    return ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_vocabulary_matches_openai():
    """OpenAI's simple_tokenizer builds the same vocabulary and merge ranks (loaded from its file:
    the clip package's __init__ needs torchvision)."""
    path = os.path.join(os.path.dirname(clip_bpe_path()), "simple_tokenizer.py")
    spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", path)
    simple = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(simple)
    openai = simple.SimpleTokenizer(clip_bpe_path())
    vocab, merges = clip_bpe_vocab()
    assert len(vocab) == 49408 and vocab == openai.encoder
    assert {m: i for i, m in enumerate(merges)} == openai.bpe_ranks


def test_example_ids():
    tok = Tokenizer.from_clip_bpe()
    ids = tok(["a photograph of an astronaut riding a horse"])
    assert ids.dtype == torch.int64 and ids.shape == (1, 77)
    assert ids[0].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558] + [49407] * 68
    assert tok.vocab_size == 49408 and tok.count("a photograph of an astronaut riding a horse") == 8


@pytest.mark.slow  # 1000 prompts: 2.5 s
def test_matches_transformers(files):
    texts = prompts()
    assert len(texts) >= 1000
    ref = reference(files)
    for tok in (Tokenizer.from_clip_bpe(), Tokenizer.from_folder(files)):
        ours = tok(texts)
        theirs = reference_ids(ref, texts)
        for i, text in enumerate(texts):  # one by one, so a failure names its prompt
            assert torch.equal(ours[i], theirs[i]), repr(text)
        counts = [tok.count(t) for t in texts]
        assert counts == [len(ref(t, add_special_tokens=False).input_ids) for t in texts]
    # The generator really produced cut prompts and prompts with every kind of piece.
    assert sum(c > 75 for c in counts) >= 100 and min(counts) == 0


@pytest.mark.slow  # 1000 prompts: 4 s; test_matches_transformers stays fast
def test_sd2_tokenizer_matches_diffusers(files, tmp_path):
    """SD 2's tokenizer: the same BPE, padded with "!" (id 0), which transformers also makes a special
    token (a "!" in the prompt becomes id 0). From the BPE file, and from a folder as SD 2's is saved
    (its special_tokens_map.json names the padding), against transformers' CLIPTokenizer so built."""
    texts = prompts()
    ref = CLIPTokenizer(os.path.join(files, "vocab.json"), os.path.join(files, "merges.txt"), pad_token="!")
    # tokenizer_config.json as transformers writes it, beside the vocabulary files hub folders carry
    for name, tok in (("sd2_tokenizer", ref), ("sd1_tokenizer", reference(files))):
        tok.save_pretrained(str(tmp_path / name))
        write_vocab_files(str(tmp_path / name))
    theirs = reference_ids(ref, texts)
    assert (theirs == 0).sum() > 40_000 and any("!" in t for t in texts)
    for tok in (Tokenizer.from_clip_bpe(pad="!"), Tokenizer.from_folder(str(tmp_path / "sd2_tokenizer"))):
        assert tok.pad_id == 0
        ours = tok(texts)
        for i, text in enumerate(texts):
            assert torch.equal(ours[i], theirs[i]), repr(text)
        assert [tok.count(t) for t in texts] == [len(ref(t, add_special_tokens=False).input_ids) for t in texts]
    # SD 1's folder (padding named <|endoftext|>) still pads with the end token.
    assert Tokenizer.from_folder(str(tmp_path / "sd1_tokenizer")).pad_id == 49407


def test_truncation():
    tok = Tokenizer.from_clip_bpe()
    text = " ".join(f"word{i}" for i in range(60))  # each word is several tokens
    ids = tok([text])[0]
    assert tok.count(text) > 75
    assert ids[0] == 49406 and ids[76] == 49407
    assert ids[1:76].tolist() == tok.token_ids(text)[:75]
    assert (ids[1:76] != 49407).all()


ADDED = ["<v>", "<r0_0>", "<r0_1>", "<R1_0>", "<concept-a>"]
ADDED_PROMPTS = ["a photo of <v> on the beach", "<v><r0_0>", "<v>.", "<V> and <R0_0>, <r0_1>!", "<r1_0> <R1_0>",
                 "x<v>y", "a  <v>\t<r0_0>s", "<v>'s dog", "<v> <r0_0> <r0_1> <r1_0>", "(<v>)", "<<v>>", "<v",
                 "<concept-a>-like <CONCEPT-A>", "photo of <v> " + "very " * 80 + "<v>", "<v>" * 90, ""]


def test_added_tokens_match_transformers(files):
    tok, ref = Tokenizer.from_clip_bpe(), reference(files)
    assert tok.add_tokens(ADDED) == list(range(49408, 49408 + len(ADDED)))
    assert ref.add_tokens(ADDED) == len(ADDED)
    assert tok.vocab_size == len(ref) == 49408 + len(ADDED)
    rng = random.Random(1)
    texts = ADDED_PROMPTS + [prompt.replace(" ", f" {rng.choice(ADDED)}{rng.choice(['', ' ', '.', 'x'])}", rng.randint(0, 3))
                             for prompt in prompts()[10:400]]
    ours, theirs = tok(texts), reference_ids(ref, texts)
    for i, text in enumerate(texts):
        assert torch.equal(ours[i], theirs[i]), repr(text)
    # Single tokens wherever they stand, whatever their case.
    assert tok.token_ids("a photo of <v> on the beach") == [320, 1125, 539, 49408, 525, 518, 2117]
    assert tok.token_ids("<V><r0_0>.") == [49408, 49409, 269]
    assert tok.token_ids("<r1_0>") == [49411]


def test_add_tokens_rejects_clashes():
    tok = Tokenizer.from_clip_bpe()
    assert tok.add_tokens(["<v>"]) == [49408]
    for bad in ["<v>", "<V>", "dog", "a", "<|endoftext|>", "", "<a b>", "<v>\n"]:
        with pytest.raises(UserError):
            tok.add_tokens([bad])
    assert tok.vocab_size == 49409


def test_from_folder_missing_files(tmp_path):
    with pytest.raises(UserError, match="merges.txt"):
        (tmp_path / "vocab.json").write_text("{}")
        Tokenizer.from_folder(str(tmp_path))
