"""Fixtures for the CLIP tokenizer (src/tokenizer.rs, tests/tokenizer.rs): token ids from
transformers' slow `CLIPTokenizer`, the reference the Rust tokenizer must equal id for id.

    pip install transformers==4.57.1 open_clip_torch   # open_clip only for its BPE file
    python3 tools/make_tokenizer_fixtures.py [--out tests/fixtures/tokenizer] [--seed 77]

ftfy: `CLIPTokenizer` cleans text with `ftfy.fix_text` when ftfy imports, and with transformers'
`BasicTokenizer(strip_accents=False, do_split_on_punc=False)` when it does not. open_clip_torch
pulls ftfy in, but the default install of transformers (and diffusers) has no ftfy, and that is
the behaviour the Rust tokenizer implements. So this script makes ftfy unimportable before
transformers is imported, and checks that the tokenizer took the BasicTokenizer path.

What it writes (under --out):

- `clip/vocab.json.gz`, `clip/merges.txt.gz`: the full CLIP vocabulary (49408 tokens, 48894
  merges), derived from open_clip's `bpe_simple_vocab_16e6.txt.gz` as the published CLIP
  tokenizers are (openai/clip-vit-large-patch14): merges = lines 1..48894 of that file; vocab =
  the 256 byte characters, the same with `</w>`, each merge joined, `<|startoftext|>`,
  `<|endoftext|>`. Checked against well-known ids ("a photo of a cat" -> 49406 320 1125 539 320
  2368 49407). Gzipped (the test unpacks them into a temporary folder).
- `clip/tokenizer_config.json` (SD 1.x: pads with `<|endoftext|>`) and
  `clip/tokenizer_config.sd2.json` (SD 2.x / OpenCLIP: pads with `!`, id 0), both written by
  transformers' `save_pretrained` (the current format, with `added_tokens_decoder`).
- `clip_cases.json.gz`: >= 2000 strings (fixed seed; categories below) and transformers' ids
  with `padding="max_length", truncation=True, max_length=77`: `ids` are the real tokens (BOS ..
  EOS, the attention mask's length; the rest is padding), `truncated` whether the text had more
  than 75 tokens, `sd2` the real ids under the SD2 config where they differ (a `!` in the text is
  a special token there, split out before the BPE).
- `small/` and `small-sd2/`: complete tokenizer folders with the first 1000 merges only (vocab =
  512 byte tokens + 1000 merges + 2 special tokens = 1514), for a tiny test pipeline; `small`
  pads with `<|endoftext|>`, `small-sd2` with `!`.
- `small_cases.json.gz`: transformers' ids on the small vocabulary for several config variants
  (each a base folder plus files to write over or delete, and vocabulary entries to drop):
  both folders, the legacy SD2 layout (`special_tokens_map.json` overriding a
  `tokenizer_config.json` without `added_tokens_decoder`), `special_tokens_map.json` alone,
  lstrip/rstrip/single_word flags on the special tokens, tokens missing from the vocabulary
  (-> unk), and a model_max_length of 16.

`--extra N` writes about N more strings (more seeds, and random code points from every plane)
to /tmp/clip_extra_cases.json.gz instead, not committed, for a wider check:
`TOKENIZER_EXTRA_CASES=/tmp/clip_extra_cases.json.gz cargo test --test tokenizer -- --ignored`.

Characters assigned after Unicode 14.0 (the `unicodedata` of Python 3.11) are left out of the
strings: Python 3.11 drops them as unassigned (category Cn, "control") while the Rust side
classifies them with Unicode 16 tables; which one is "right" depends on the Python version the
reference runs on.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import os
import random
import shutil
import string
import sys
import tempfile
import unicodedata

# Before transformers: CLIPTokenizer must take its no-ftfy path (see the module docstring).
sys.modules["ftfy"] = None  # `import ftfy` now raises ImportError

import regex  # noqa: E402  (transformers' own dependency; its Unicode tables are newer than Python's)
import transformers  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

TRANSFORMERS_VERSION = "4.57.1"
MAX_LENGTH = 77
N_MERGES = 49152 - 256 - 2  # 48894, what CLIPTokenizer reads of merges.txt
SMALL_MERGES = 1000


# --------------------------------------------------------------------------------------------
# Vocabulary


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def open_clip_bpe_path() -> str:
    spec = importlib.util.find_spec("open_clip")  # locate without importing (it imports ftfy)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open_clip_torch is not installed: pip install open_clip_torch")
    return os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")


def derive_vocab(n_merges: int) -> tuple[dict[str, int], list[str]]:
    with gzip.open(open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : n_merges + 1]
    assert len(merges) == n_merges and all(len(m.split()) == 2 for m in merges)
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "derived vocabulary has duplicate tokens"
    return vocab, merges


def write_vocab_files(folder: str, vocab: dict[str, int], merges: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def saved_config(folder: str, **kwargs) -> dict:
    """tokenizer_config.json as transformers' save_pretrained writes it today."""
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), **kwargs)
    with tempfile.TemporaryDirectory() as out:
        tok.save_pretrained(out)
        with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
            return json.load(f)


def write_json(path: str, obj, indent: int | None = 2) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def gzip_file(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(data)


def load(folder: str) -> CLIPTokenizer:
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.fix_text is None, "ftfy was imported: the fixtures must come from the BasicTokenizer path"
    return tok


def encode(tok: CLIPTokenizer, text: str, max_length: int = MAX_LENGTH) -> tuple[list[int], bool]:
    """(real ids: BOS .. EOS, truncated?) with the padding checked to be pad ids."""
    enc = tok(text, padding="max_length", truncation=True, max_length=max_length)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert len(ids) == max_length, (text, ids)
    n = sum(mask)
    assert mask == [1] * n + [0] * (max_length - n), (text, mask)
    assert ids[n:] == [tok.pad_token_id] * (max_length - n), (text, ids)
    full = tok(text, truncation=False)["input_ids"]
    truncated = len(full) > max_length
    if truncated:
        assert ids == full[: max_length - 1] + [tok.eos_token_id], text
    return ids[:n], truncated


# --------------------------------------------------------------------------------------------
# Test strings

WORDS = """a an the of on in at with and or for to from by under over photo photograph painting
portrait landscape cat dog horse astronaut robot castle forest mountain river ocean city street
car train ship dragon wizard knight princess girl boy woman man old young child flower rose tree
sky cloud sun moon star night day sunset sunrise rain snow storm fire water ice stone gold silver
glass wooden metal red blue green yellow purple orange black white pink brown grey beautiful
detailed intricate highly realistic photorealistic cinematic dramatic soft hard warm cold dark
bright colorful vibrant muted epic tiny huge giant small big cute scary happy sad lonely ancient
futuristic cyberpunk steampunk fantasy medieval victorian modern abstract surreal minimalist
watercolor oil acrylic pencil sketch charcoal ink digital art illustration render concept
character design studio lighting volumetric bokeh depth field lens wide angle macro telephoto
trending artstation unreal engine octane masterpiece best quality ultra resolution sharp focus
smooth elegant hyperdetailed award winning national geographic kodak portra fujifilm canon nikon
sony leica analog film grain vintage retro noir pastel neon glowing shiny matte""".split()

SUBJECTS = """a cat|a dog|an astronaut riding a horse|a red fox in the snow|a lighthouse on a cliff|
an old fisherman|a bowl of ramen|a cyberpunk city at night|a dragon made of glass|a cozy cabin|
a samurai in the rain|a field of sunflowers|a steampunk airship|a portrait of a young woman|
a robot reading a book|a castle in the clouds|a tiger in the jungle|a cup of coffee|
an ancient temple|a futuristic sports car|a koi pond|a mountain lake at dawn|a bustling market|
a jellyfish in deep sea|a wizard casting a spell|a vintage typewriter|a hummingbird|
a snowy village|a desert caravan|a Victorian library""".replace("\n", "").split("|")

MODIFIERS = """highly detailed|8k|4k uhd|trending on artstation|by greg rutkowski|octane render|
unreal engine 5|cinematic lighting|golden hour|studio ghibli style|oil painting|watercolor|
photorealistic|sharp focus|bokeh|35mm|f/1.8|ISO 100|award-winning photo|concept art|
digital painting|matte painting|volumetric fog|soft light|dramatic shadows|vivid colors|
(masterpiece:1.2)|((best quality))|[blurry]|{highres}|ultra-detailed|hyper realistic|
8K RAW photo|Canon EOS R5|Kodak Portra 400|by Alphonse Mucha|in the style of Van Gogh|
low poly|isometric|pixel art|line art|cel shaded|HDR|DSLR|wide-angle lens|macro shot|
rim lighting|subsurface scattering|ray tracing|intricate details|elegant|symmetrical""".replace(
    "\n", ""
).split("|")

NEGATIVE = """lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits,
cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark,
username, blurry""".replace("\n", " ")

ACCENTED = """café naïve résumé façade jalapeño piñata über Müller Straße ſtraße Ærø smørrebrød
Łódź Kraków Dvořák Škoda Ångström Curaçao São Paulo Brasília crème brûlée déjà vu El Niño
Nguyễn Tiếng Việt Phở İstanbul Iğdır ışık ŞEHİR Çağrı Ελλάδα ΟΔΥΣΣΕΥΣ Σίσυφος ΣΑΣ λόγος
Москва Привет Ёлка Україна Київ Երևան თბილისი עברית العربية हिन्दी ภาษาไทย Ελληνικά ĲSSEL
ǅemal ǈubljana ﬁnance ﬂower ΐ ǰ ẞ Æsir œuvre ÉCOLE ÀÉÎÕÜ""".split()

EMOJI_SINGLE = list("😀😂🥲😍🤖👾🎨🖼🌅🌄🌈🔥💧🌊🍜🍣☕🐱🐶🦊🐉🦄🌸🌻🍄🚀🛸🏰🗻⛩🎃⭐✨⚡❤💔👍👎👀🙏💪🤝🧠🫀")
SKIN = ["\U0001F3FB", "\U0001F3FC", "\U0001F3FD", "\U0001F3FE", "\U0001F3FF"]
SKIN_BASES = list("👍👋🙏💪🤝✌👌🧑👩👨🧒👶🏃🧘")
ZWJ = [
    "👨‍👩‍👧‍👦", "👩‍❤️‍👨", "👩‍💻", "👨🏽‍🚀", "🧑🏿‍🎨", "🏳️‍🌈", "🏴‍☠️", "👁️‍🗨️", "🐻‍❄️", "🧑‍🤝‍🧑",
    "👩🏻‍🦰", "🧔‍♂️", "🏃‍♀️", "🤷🏾‍♂️", "👨‍👨‍👦", "😶‍🌫️", "❤️‍🔥", "🐈‍⬛", "🧑🏼‍🔬", "👩‍👩‍👧",
]
FLAGS = ["🇺🇸", "🇯🇵", "🇫🇷", "🇩🇪", "🇧🇷", "🇮🇳", "🇺🇦", "🇪🇺", "🏴󠁧󠁢󠁥󠁮󠁧󠁿", "🏴󠁧󠁢󠁳󠁣󠁴󠁿"]
KEYCAPS = ["1️⃣", "#️⃣", "*️⃣", "0⃣", "9️⃣"]
VS = ["\uFE0F", "\uFE0E"]

CJK_TEXT = """一只可爱的猫 山水画 赛博朋克城市的夜景 故宫 龙 春天的樱花 高清 杰作 最高画质 水墨画风格
東京タワー ねこ カワイイ 富士山の夕焼け 桜の木の下で 「こんにちは」。 ｶﾀｶﾅ ひらがなとカタカナ
서울의 밤 고양이 한국어 텍스트 안녕하세요 아름다운 풍경 김치찌개 ＡＢＣ ｆｕｌｌｗｉｄｔｈ １２３ 〜 ・ 々
豈 更 車 賈 滑 串 句 龜 龜 契 㐀 㒳 𠀀 𠜎 𡃁 𪚥 𫝀 𬺰 𰀀""".split()

WHITESPACE = [" ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\xa0", "\u1680", "\u2000", "\u2002",
              "\u2003", "\u2007", "\u2009", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
              "\x85", "\u180e", "\u200b", "\ufeff", "\x1c", "\x1d", "\x1e", "\x1f", "\t\t\t", "\n\n",
              " \t \n ", "\u3000\u3000"]

CONTROLS = ([chr(c) for c in range(0x00, 0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0, 3)]
            + ["\ufffd", "\u00ad", "\u200c", "\u200d", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c",
               "\u202d", "\u202e", "\u2060", "\u2061", "\u2062", "\u2063", "\u2064", "\u2066", "\u2069",
               "\ufeff", "\ufff9", "\ufffa", "\ufffb", "\ue000", "\uf8ff", "\U000f0000", "\U0010fffd",
               "\u0378", "\u0380", "\u0590", "\ufffe", "\uffff", "\U0010ffff", "\U000e0001", "\U000e0041",
               "\U000e007f", "\u0600", "\u06dd", "\u070f", "\U000110bd", "\U0001d173"])

PUNCT_EXTRA = list("“”‘’«»—–…¿¡·•†‡‰′″§¶©®™°±×÷¬¦¤¢£¥€₹₽‹›„‚〈〉【】〔〕《》、。，：；？！（）")

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]

CONTRACTIONS = ["it's", "IT'S", "It's", "we're", "WE'RE", "you've", "I'm", "i'M", "she'll", "SHE'LL",
                "he'd", "don't", "can't", "won't", "y'all", "o'clock", "rock'n'roll", "'s", "''s",
                "'", "''", "'''", "’s", "it’s", "don’t", "'S'T'RE", "'ſ", "ſ", "'ſt", "'dd", "'lll",
                "'mm", "'ve'", "'re's", "l'amour", "aujourd'hui", "'tis", "’tis", "'twas", "'70s",
                "90's", "rock 'n' roll", "Ma'am", "ʼs", "`s", "´s"]


def rand_word(rng: random.Random) -> str:
    w = rng.choice(WORDS)
    r = rng.random()
    if r < 0.15:
        return w.upper()
    if r < 0.35:
        return w.capitalize()
    return w


def sentence(rng: random.Random, lo: int, hi: int, seps=(" ",)) -> str:
    return rng.choice(seps).join(rand_word(rng) for _ in range(rng.randint(lo, hi)))


def prompt(rng: random.Random, lo: int = 1, hi: int = 8) -> str:
    parts = [rng.choice(SUBJECTS).strip()]
    parts += rng.sample(MODIFIERS, rng.randint(lo, hi))
    text = rng.choice([", ", ",", " , ", ". ", " | "]).join(p.strip() for p in parts)
    if rng.random() < 0.2:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.1:
        text += rng.choice([".", "!", "...", " :)", "!!!"])
    return text


def insert_random(rng: random.Random, text: str, pieces: list[str], count: int) -> str:
    for _ in range(count):
        i = rng.randint(0, len(text))
        text = text[:i] + rng.choice(pieces) + text[i:]
    return text


def random_codepoint(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x250, 0x2FF), (0x300, 0x36F), (0x370, 0x52F), (0x530, 0x8FF),
              (0x900, 0xDFF), (0xE00, 0x10FF), (0x1100, 0x11FF), (0x1200, 0x1FFF), (0x2000, 0x2BFF),
              (0x2C00, 0x2FFF), (0x3000, 0x30FF), (0x3100, 0x4DBF), (0x4E00, 0x9FFF), (0xA000, 0xABFF),
              (0xAC00, 0xD7FF), (0xF900, 0xFFFD), (0x10000, 0x1FFFF), (0x20000, 0x2FFFF), (0xE0000, 0xE01EF)]
    lo, hi = rng.choice(ranges)
    return chr(rng.randint(lo, hi))


def make_strings(rng: random.Random) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def add(cat: str, text: str) -> None:
        out.append((cat, text))

    for _ in range(200):
        add("ascii", sentence(rng, 1, 14, seps=(" ", " ", "  ", ", ", "-", "_", "/")))
    for _ in range(150):
        p = string.punctuation
        kind = rng.random()
        if kind < 0.3:
            add("punctuation", "".join(rng.choice(p) for _ in range(rng.randint(1, 12))))
        elif kind < 0.6:
            add("punctuation", insert_random(rng, sentence(rng, 2, 8), list(p) + PUNCT_EXTRA, rng.randint(1, 6)))
        else:
            add("punctuation", rng.choice([
                "https://example.com/a/b?c=d&e=f#g", "user@example.org", "C:\\Users\\me\\file.txt",
                "C++ and C# !!!", "a.b.c", "...", "?!", "(((", ")))", "[[x]]", "{a: b}", "::", "##tag",
                "@user", "#hashtag", ":-)", ";)", "<3", "->", "=>", "<br/>", "&amp;", "100%", "$5",
                "__init__", "x^2", "~~~", "**bold**", "`code`", "\"quoted\"", "'single'", "a/b\\c",
            ]) + rng.choice(["", " ", " " + sentence(rng, 1, 4)]))
    unicode_digits = list("٣٤۵३४০১๑๒１２３²³¹½¼¾ⅠⅫⅻ①②⑩⓪𝟙𝟚߀")
    for _ in range(100):
        kind = rng.random()
        if kind < 0.3:
            add("digits", str(rng.randint(0, 10 ** rng.randint(1, 12))))
        elif kind < 0.5:
            add("digits", f"{rng.uniform(-1000, 1000):.{rng.randint(1, 5)}f}")
        elif kind < 0.7:
            add("digits", rng.choice(["1,000,000", "2023-05-17", "12:34:56", "1920x1080", "v1.5", "8k",
                                      "4K", "3.14159", "+1 (555) 123-4567", "0x1F600", "1e-5", "50%",
                                      "No. 5", "24/7", "3D", "2.5D", "1st 2nd 3rd 4th", "(1:1.4)"]))
        else:
            add("digits", "".join(rng.choice(unicode_digits + list("0123456789")) for _ in range(rng.randint(1, 8))))
    for _ in range(150):
        words = rng.sample(ACCENTED, rng.randint(1, 4))
        text = " ".join(words)
        r = rng.random()
        if r < 0.35:
            text = unicodedata.normalize("NFD", text)
        elif r < 0.45:
            text = unicodedata.normalize("NFKD", text)
        elif r < 0.55:
            text = text.upper()
        elif r < 0.6:
            text = insert_random(rng, text, ["\u0301", "\u0308", "\u0345", "\u0327", "\u0303\u0323"], 2)
        add("accents", text)
    for _ in range(200):
        r = rng.random()
        if r < 0.2:
            e = "".join(rng.choice(EMOJI_SINGLE) + rng.choice(["", "", rng.choice(VS)]) for _ in range(rng.randint(1, 4)))
        elif r < 0.4:
            e = "".join(rng.choice(SKIN_BASES) + rng.choice(SKIN) for _ in range(rng.randint(1, 3)))
        elif r < 0.65:
            e = "".join(rng.choice(ZWJ) for _ in range(rng.randint(1, 3)))
        elif r < 0.8:
            e = "".join(rng.choice(FLAGS + KEYCAPS) for _ in range(rng.randint(1, 3)))
        else:
            e = rng.choice(SKIN) + rng.choice(EMOJI_SINGLE) + "\u200d" + rng.choice(["", "\u200d"])
        text = rng.choice([e, e + " " + sentence(rng, 1, 4), sentence(rng, 1, 4) + e, prompt(rng, 1, 3) + " " + e,
                           sentence(rng, 1, 3) + " " + e + " " + sentence(rng, 1, 3)])
        add("emoji", text)
    for _ in range(150):
        words = [rng.choice(CJK_TEXT) for _ in range(rng.randint(1, 4))]
        r = rng.random()
        if r < 0.3:
            text = "".join(words)
        elif r < 0.5:
            text = " ".join(words + [sentence(rng, 1, 3)])
        elif r < 0.6:
            text = unicodedata.normalize("NFD", " ".join(words))  # Hangul to jamo and back (NFC)
        else:
            text = rng.choice(["", "  "]).join(words)
        add("cjk", text)
    for _ in range(150):
        r = rng.random()
        if r < 0.2:
            text = "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 6)))
        else:
            words = [rand_word(rng) for _ in range(rng.randint(1, 6))]
            text = "".join(w + "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 3))) for w in words)
            if rng.random() < 0.5:
                text = "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 3))) + text
        add("whitespace", text)
    for _ in range(150):
        r = rng.random()
        if r < 0.2:
            text = "".join(rng.choice(CONTROLS) for _ in range(rng.randint(1, 5)))
        elif r < 0.4:
            w = rand_word(rng)
            i = rng.randint(0, len(w))
            text = w[:i] + rng.choice(CONTROLS) + w[i:]  # a control char inside a word is removed
        else:
            text = insert_random(rng, sentence(rng, 1, 6), CONTROLS + WHITESPACE, rng.randint(1, 5))
        add("control", text)
    for _ in range(100):
        s = rng.choice(SPECIALS)
        r = rng.random()
        if r < 0.2:
            text = s
        elif r < 0.4:
            text = sentence(rng, 0, 3) + rng.choice(["", " ", "  ", "!", ".", "\n"]) + s + rng.choice(["", " ", "!", "x", "."]) + sentence(rng, 0, 3)
        elif r < 0.5:
            text = s.upper() + " " + sentence(rng, 1, 3)
        elif r < 0.6:
            i = rng.randint(1, len(s) - 1)
            text = s[:i] + rng.choice(["\x00", "\u200b", "\u00ad", " ", "\t", "\ufffd"]) + s[i:]
        elif r < 0.7:
            text = "".join(rng.choice(SPECIALS + ["!", " ", "a", "!!"]) for _ in range(rng.randint(2, 6)))
        elif r < 0.8:
            text = rng.choice(["<|ſtartoftext|>", "<|endoftext", "|endoftext|>", "<|startoftext|>hello", "<|<|endoftext|>|>",
                               "<|endoftext|><|endoftext|>", "<|startoftext|>  <|endoftext|>", "<| endoftext |>",
                               "<|EndOfText|>", "＜|endoftext|＞"])
        else:
            text = rng.choice(["hello!", "wow!!", "!", "!!", "! !", "!a!", "a!b", "yes!!!", "!?", "?!", "(!)",
                               "!" + sentence(rng, 1, 3), sentence(rng, 1, 3) + " !", "!!!!!!!!"]) + rng.choice(["", " <|endoftext|>"])
        add("special", text)
    for _ in range(80):
        c = rng.choice(CONTRACTIONS)
        add("contractions", rng.choice([c, c + " " + sentence(rng, 1, 3), sentence(rng, 1, 3) + " " + c,
                                        rand_word(rng) + c]))
    for _ in range(120):
        r = rng.random()
        if r < 0.4:
            text = prompt(rng, 12, 30)
            while len(text) < 400:
                text += ", " + prompt(rng, 3, 8)
        elif r < 0.55:
            text = " ".join([rand_word(rng)] * rng.randint(76, 140))
        elif r < 0.65:
            text = "".join(rng.choice("0123456789") for _ in range(rng.randint(74, 200)))
        elif r < 0.75:
            text = "".join(rng.choice(EMOJI_SINGLE) for _ in range(rng.randint(40, 90)))
        elif r < 0.85:
            text = "".join(rng.choice(CJK_TEXT) for _ in range(rng.randint(30, 60)))
        elif r < 0.92:
            text = NEGATIVE + ", " + NEGATIVE
        else:
            text = sentence(rng, 72, 80)  # around the 75-token edge
        add("long", text)
    for i in range(74, 78):
        add("long", " ".join(["cat"] * i))  # 74..77 tokens: 75 fits exactly, 76 is truncated
    for text in ["", " ", "  ", "\n", "\t", "\x00", "\ufffd", "\u200b", "\u00ad", "a", "A", "!", ".", "'", "0",
                 "00", "a b", "ab", "\u3000", "\u2028", "\u2029", "\u0345", "a\u0345b", "\u0345\u0345", "x" * 300,
                 "ı", "İ", "ΣΑΣ", "ς", "σ", "Σ", "ǅ", "K", "Å", "ﬀ", "ß", "ẞ"]:
        add("edge", text)
    for _ in range(250):
        n = rng.randint(1, 12)
        chars = [random_codepoint(rng) for _ in range(n)]
        if rng.random() < 0.5:
            chars.insert(rng.randint(0, n), " " + rand_word(rng) + " ")
        add("random", "".join(chars))
    for _ in range(400):
        r = rng.random()
        if r < 0.7:
            add("prompt", prompt(rng))
        elif r < 0.85:
            add("prompt", prompt(rng, 0, 3) + " " + rng.choice(ZWJ + EMOJI_SINGLE))
        else:
            add("prompt", prompt(rng, 2, 5).replace(", ", rng.choice([",\n", ",\t", ", ", ",  "])))
    return out


def wild_string(rng: random.Random) -> str:
    """Code points from anywhere (surrogates excepted), some between ASCII words and spaces."""
    chars = []
    for _ in range(rng.randint(1, 24)):
        r = rng.random()
        if r < 0.5:
            cp = rng.randint(0, 0x10FFFF)
            while 0xD800 <= cp < 0xE000:
                cp = rng.randint(0, 0x10FFFF)
            chars.append(chr(cp))
        elif r < 0.7:
            chars.append(random_codepoint(rng))
        elif r < 0.85:
            chars.append(rng.choice(WHITESPACE + CONTROLS + ["'", "'s", "!", "<|endoftext|>"]))
        else:
            chars.append(rand_word(rng))
    return "".join(chars)


def make_cases(strings: list[tuple[str, str]], tok: CLIPTokenizer, tok2: CLIPTokenizer) -> tuple[list[dict], int]:
    """transformers' ids for each string (SD1, and SD2 where they differ); characters newer than
    Unicode 14 left out (returned: how many)."""
    dropped = 0
    cases, seen = [], set()
    for cat, text in strings:
        kept = "".join(c for c in text if stable(c) and not 0xD800 <= ord(c) < 0xE000)
        dropped += len(text) - len(kept)
        if (cat, kept) in seen:
            continue
        seen.add((cat, kept))
        ids, truncated = encode(tok, kept)
        case = {"cat": cat, "text": kept, "ids": ids, "truncated": truncated}
        ids2, truncated2 = encode(tok2, kept)
        assert ids2[0] == ids[0] and ids2[-1] == ids[-1]
        if ids2 != ids:
            case["sd2"] = ids2
            case["sd2_truncated"] = truncated2
        cases.append(case)
    return cases, dropped


def write_cases(path: str, cases: list[dict], seed: int) -> None:
    body = io.StringIO()
    body.write('{"transformers": %s, "seed": %d, "max_length": %d, "cases": [\n'
               % (json.dumps(transformers.__version__), seed, MAX_LENGTH))
    body.write(",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases))
    body.write("\n]}\n")
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(body.getvalue().encode("utf-8"))


def py_category(c: str) -> str:
    return unicodedata.category(c)


_REGEX_CATS = ["Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi",
               "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn"]
_regex_cat_cache: dict[str, str] = {}


def regex_category(c: str) -> str:
    """The category by the `regex` module's newer Unicode tables."""
    if c not in _regex_cat_cache:
        _regex_cat_cache[c] = next((k for k in _REGEX_CATS if regex.match(r"\p{%s}" % k, c)), "?")
    return _regex_cat_cache[c]


def stable(c: str) -> bool:
    """False for characters whose category changed after Unicode 14.0 (mostly: newly assigned)."""
    return py_category(c) == regex_category(c)


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tokenizer"))
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--extra", type=int, default=0, metavar="N",
                    help="instead of the fixtures, write about N more strings (more seeds, plus random code points "
                         "from every plane) to --extra-out, for `TOKENIZER_EXTRA_CASES=PATH cargo test --test "
                         "tokenizer -- --ignored`")
    ap.add_argument("--extra-out", default=os.path.join(tempfile.gettempdir(), "clip_extra_cases.json.gz"))
    args = ap.parse_args()

    try:
        import ftfy  # noqa: F401
        sys.exit("ftfy is importable; the fixtures need CLIPTokenizer's BasicTokenizer path")
    except ImportError:
        pass
    if transformers.__version__ != TRANSFORMERS_VERSION:
        print(f"warning: transformers {transformers.__version__}, the fixtures were made with {TRANSFORMERS_VERSION}")

    transformers.logging.set_verbosity_error()  # "sequence longer than 77" on purpose
    out = os.path.abspath(args.out)
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        # Full vocabulary.
        vocab, merges = derive_vocab(N_MERGES)
        assert len(vocab) == 49408
        full = os.path.join(tmp, "clip")
        write_vocab_files(full, vocab, merges)
        sd1_config = saved_config(full, model_max_length=MAX_LENGTH)
        sd2_config = saved_config(full, model_max_length=MAX_LENGTH, pad_token="!")
        write_json(os.path.join(full, "tokenizer_config.json"), sd1_config)
        full_sd2 = os.path.join(tmp, "clip-sd2")
        write_vocab_files(full_sd2, vocab, merges)
        write_json(os.path.join(full_sd2, "tokenizer_config.json"), sd2_config)
        tok, tok2 = load(full), load(full_sd2)
        assert (tok.pad_token_id, tok2.pad_token_id) == (49407, 0), (tok.pad_token_id, tok2.pad_token_id)
        known = {
            "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
            "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
            "hello world": [49406, 3306, 1002, 49407],
        }
        for text, ids in known.items():
            got = tok(text)["input_ids"]
            assert got == ids, f"derived vocabulary: {text!r} -> {got}, expected {ids}"

        if args.extra:
            strings = []
            for k in range(args.extra // 2000 + 1):
                strings += make_strings(random.Random(args.seed * 1000 + k))
            strings += [("wild", wild_string(rng)) for _ in range(args.extra // 2)]
            cases, dropped = make_cases(strings, tok, tok2)
            write_cases(args.extra_out, cases, args.seed)
            print(f"{len(cases)} extra strings ({dropped} characters newer than Unicode 14 left out) -> {args.extra_out}")
            return

        cases, dropped = make_cases(make_strings(rng), tok, tok2)
        assert len(cases) >= 2000, len(cases)

        os.makedirs(os.path.join(out, "clip"), exist_ok=True)
        gzip_file(os.path.join(full, "vocab.json"), os.path.join(out, "clip", "vocab.json.gz"))
        gzip_file(os.path.join(full, "merges.txt"), os.path.join(out, "clip", "merges.txt.gz"))
        write_json(os.path.join(out, "clip", "tokenizer_config.json"), sd1_config)
        write_json(os.path.join(out, "clip", "tokenizer_config.sd2.json"), sd2_config)
        write_cases(os.path.join(out, "clip_cases.json.gz"), cases, args.seed)

        # Small vocabulary: the first 1000 merges.
        small_vocab, small_merges = derive_vocab(SMALL_MERGES)
        assert len(small_vocab) == 1514
        for name, kwargs in [("small", {}), ("small-sd2", {"pad_token": "!"})]:
            folder = os.path.join(out, name)
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            write_vocab_files(folder, small_vocab, small_merges)
            write_json(os.path.join(folder, "tokenizer_config.json"),
                       saved_config(folder, model_max_length=MAX_LENGTH, **kwargs))

        def token_obj(content: str, **flags) -> dict:
            obj = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
            obj.update(flags)
            return obj

        legacy_config = {  # as stabilityai/stable-diffusion-2's tokenizer/tokenizer_config.json
            "add_prefix_space": False,
            "bos_token": {"__type": "AddedToken", **token_obj("<|startoftext|>")},
            "do_lower_case": True,
            "eos_token": {"__type": "AddedToken", **token_obj("<|endoftext|>")},
            "errors": "replace",
            "model_max_length": MAX_LENGTH,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": {"__type": "AddedToken", **token_obj("<|endoftext|>")},
        }
        legacy_map = {"bos_token": token_obj("<|startoftext|>"), "eos_token": token_obj("<|endoftext|>"),
                      "pad_token": "!", "unk_token": token_obj("<|endoftext|>")}
        map_only = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        flags_config = json.loads(json.dumps(saved_config(os.path.join(out, "small-sd2"), model_max_length=MAX_LENGTH,
                                                          pad_token="!")))
        for idx, tokobj in flags_config["added_tokens_decoder"].items():
            if tokobj["content"] == "<|endoftext|>":
                tokobj.update(lstrip=True, rstrip=True)
            elif tokobj["content"] == "<|startoftext|>":
                tokobj.update(single_word=True)
            elif tokobj["content"] == "!":
                tokobj.update(rstrip=True)
        max16 = dict(saved_config(os.path.join(out, "small"), model_max_length=16))
        drop = ["the</w>", "in", "on</w>", "th", "an", "ing</w>", "er", "é</w>"]
        drop = [t for t in drop if t in small_vocab]
        variants = [
            ("small", "small", {}, [], MAX_LENGTH),
            ("small-sd2", "small-sd2", {}, [], MAX_LENGTH),
            ("legacy-sd2", "small", {"tokenizer_config.json": legacy_config, "special_tokens_map.json": legacy_map}, [], MAX_LENGTH),
            ("map-only", "small", {"tokenizer_config.json": None, "special_tokens_map.json": map_only}, [], MAX_LENGTH),
            ("flags", "small", {"tokenizer_config.json": flags_config}, [], MAX_LENGTH),
            ("unk", "small", {}, drop, MAX_LENGTH),
            ("max16", "small", {"tokenizer_config.json": max16}, [], 16),
        ]
        small_rng = random.Random(args.seed + 1)
        small_texts = [c["text"] for c in small_rng.sample(cases, 300)]
        small_texts += [c["text"] for c in cases if c["cat"] in ("special", "edge")]
        small_texts += ["the thing in the inn on the ring", "éé é e\u0301", "hello! <|endoftext|> !", " ! ", "a !",
                        "x <|startoftext|>y", "x<|startoftext|> y", "<|endoftext|>   tail", "head\t<|endoftext|>",
                        "!<|endoftext|>!", "wow!wow", "a photo of a cat"]
        small_texts = list(dict.fromkeys(small_texts))
        small_out = {"transformers": transformers.__version__, "variants": []}
        for name, base, files, drop_tokens, max_length in variants:
            folder = os.path.join(tmp, "variant-" + name)
            shutil.copytree(os.path.join(out, base), folder)
            for fname, content in files.items():
                path = os.path.join(folder, fname)
                if content is None:
                    os.remove(path)
                else:
                    write_json(path, content)
            if drop_tokens:
                v = {t: i for t, i in small_vocab.items() if t not in drop_tokens}
                with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
                    json.dump(v, f, ensure_ascii=False)
            t = load(folder)
            rows = []
            for text in small_texts:
                ids, truncated = encode(t, text, max_length)
                rows.append([text, ids, truncated])
            small_out["variants"].append({
                "name": name, "base": base, "files": files, "drop_from_vocab": drop_tokens,
                "max_length": max_length, "bos_id": t.bos_token_id, "eos_id": t.eos_token_id,
                "pad_id": t.pad_token_id, "cases": rows,
            })
        with open(os.path.join(out, "small_cases.json.gz"), "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
                gz.write((json.dumps(small_out, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))

    counts: dict[str, int] = {}
    for c in cases:
        counts[c["cat"]] = counts.get(c["cat"], 0) + 1
    print(f"{len(cases)} strings ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
          f"{sum(c['truncated'] for c in cases)} truncated, {sum('sd2' in c for c in cases)} differ under SD2; "
          f"{dropped} characters newer than Unicode 14 left out")
    for root, _, files in os.walk(out):
        for f in sorted(files):
            p = os.path.join(root, f)
            print(f"  {os.path.relpath(p, out)}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
