"""Make the reference data the tokenizer and transform tests compare against (run once, by hand).

    /path/to/venv/bin/python tests/data/openai_reference/make_reference.py

Needs open_clip_torch 3.3.0 (with its ftfy, regex and torchvision) and Pillow, in a separate
environment: the project itself never imports open_clip or torchvision. Writes, next to this script:

- ``tokens.json``: >= 200 varied captions and the ids open_clip's tokenizer (OpenAI's CLIP tokenizer)
  gives them at context length 77, cut after the end-of-text token (``rows``: [caption, ids] pairs);
- ``resize.json``: the output size of torchvision's ``Resize(size)`` (what OpenAI's and OpenCLIP's
  preprocessing use) for common photo sizes;
- ``preprocess_*.png`` + ``preprocess.npz``: two small images and open_clip's eval preprocessing of
  them at 32 px (Resize, CenterCrop, ToTensor, Normalize), float32 [3, 32, 32] each.

Captions that contain the special tokens' names literally are left out: clip_model's tokenizer blanks
them out on purpose (see clip_model/tokenizer.py).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import open_clip
import torchvision
from PIL import Image
from torchvision import transforms

HERE = Path(__file__).resolve().parent
CONTEXT = 77

PLAIN = [
    "a photo of a dog", "A red kettle on a wooden table.", "Two cats sleeping on a sofa next to a window",
    "a close-up of a rusty bicycle on a snowy street", "The Eiffel Tower at night", "an old man playing chess",
    "a bowl of ramen with an egg", "three yellow triangles on a black background", "sunset over the ocean",
    "A child holding a balloon in the park", "a diagram of a neural network", "a painting of a ship in a storm",
    "an aerial view of a city", "a plate of spaghetti and meatballs", "a small brown puppy in the grass",
    "a black and white photo of a train station", "a bright red sports car parked on the street",
    "a group of people hiking in the mountains", "a cup of coffee with latte art",
    "a screenshot of a spreadsheet", "a hand-drawn map of an island", "a 3D render of a robot",
    "Portrait of a woman, oil on canvas, 1887", "a low-angle shot of a skyscraper",
    "the logo of a company", "a pixel art sprite of a knight", "an X-ray of a human hand",
    "a satellite image of farmland", "A BLUE CIRCLE ON A WHITE BACKGROUND", "macro shot of a bee on a flower",
]
PUNCTUATION = [
    "it's a dog's life", "IT'S A DOG'S LIFE", "they're here, we've gone, I'm sure you'll see, he'd know",
    "don't won't can't shouldn't", "rock 'n' roll", "the '90s", "O'Reilly's books", "what?!", "wait...",
    "hello -- world --- again", "(parentheses) [brackets] {braces} <angles>", "a/b\\c|d", "50% off!!!",
    "$19.99 + tax = $21.59", "email me: someone@example.com", "https://example.com/path?q=1&r=2#frag",
    "#sunset #beach @friend", "C++ & C# & F#", "def f(x): return x**2", "x = [1, 2, 3]; y = {'a': 1}",
    "~~~***___+++===", ":-) ;-) :D <3 </3", "i.e., e.g., etc.", "Mr. & Mrs. Smith", "5'11\" tall",
    "10:30 a.m. on 2024-01-31", "+1 (555) 010-9999", "-3.14e-10", "1,000,000", "“smart quotes” and ‘single’",
    "em—dash en–dash minus − hyphen-minus", "«guillemets» „low quotes“", "bullet • point · middle dot",
]
UNICODE = [
    "naïve café résumé", "Straße über Flüsse", "İstanbul ılık ışık", "ΟΔΟΣ ΣΟΦΙΑΣ", "Σίσυφος", "Москва зимой",
    "שלום עולם", "مرحبا بالعالم", "नमस्ते दुनिया", "ภาษาไทย", "東京の夜景", "北京烤鸭", "한국어 문장", "ひらがな カタカナ",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ﬁne ﬂowers ﬀ ﬃ", "x² + y³ = z⁴", "½ cup ¼ teaspoon", "Ⅻ o'clock", "ſtreet 'ſ",
    "temperature 300 K (Kelvin sign)", "resistance 5 Ω", "① ② ③", "٣ ٤ ٥ Arabic-Indic digits", "३ ४ Devanagari digits",
    "∑ ∫ √ ∞ ≈ ≠ ≤ ≥", "→ ← ↑ ↓ ⇒", "℃ ℉ № ™ © ®", "a\u0301 e\u0300 combining accents", "Å Å (precomposed vs decomposed)",
    "\u1100\u1161\u11a8 conjoining jamo", "Zalgo: Z̴̡a̷̢l̸g̵o̶", "ǅ ǈ ǋ titlecase digraphs", "ﬀ ﬄ ligatures",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝 𝑖𝑡𝑎𝑙𝑖𝑐", "𐍈 Gothic letter hwair", "Ꭳ Cherokee", "ꙮ multiocular o", "\u0378 unassigned",
]
EMOJI = [
    "a dog 🐶", "😀😃😄😁", "👍🏽 thumbs up medium skin", "👨‍👩‍👧‍👦 family", "👩🏾‍💻 technologist", "🏳️‍🌈 rainbow flag",
    "🏴‍☠️ pirate flag", "🇫🇷🇩🇪🇯🇵 flags", "1️⃣ 2️⃣ #️⃣ keycaps", "❤️ ♥ ❤ hearts", "☺️ ☺ smile",
    "🧑‍🤝‍🧑 people holding hands", "🐈‍⬛ black cat", "👁️‍🗨️ eye in speech bubble", "🤦‍♂️ facepalm",
    "a party🎉with no spaces🎉here", "🍕🍔🍟🌭", "emoji at the end 🚀", "🫠 melting face", "🏃🏻‍♀️‍➡️ runner facing right",
    "❄️☃️⛄", "✨sparkles✨", "🔥🔥🔥 fire", "👩‍❤️‍💋‍👨 kiss", "🇺🇳 United Nations",
]
INVISIBLE = [
    "zero\u200bwidth space", "zero\u200dwidth joiner", "zero\u200cwidth non-joiner", "soft\u00adhyphen",
    "\ufeffbyte order mark", "left\u200eto\u200fright marks", "word\u2060joiner", "non\u00a0breaking\u00a0space",
    "narrow\u202fno-break", "ideographic\u3000space", "en\u2002em\u2003spaces", "tab\tnew\nline\rreturn",
    "vertical\x0btab form\x0cfeed", "next\x85line", "line\u2028separator paragraph\u2029separator",
    "nul\x00char", "bell\x07 escape\x1b[31m red", "del\x7f char", "c1\x80\x9f controls", "variation\ufe0fselector",
    "interlinear\ufff9annotation\ufffb", "tag\U000e0041chars", "mongolian\u180evowel separator",
]
HTML = [
    "fish &amp; chips", "fish &amp;amp; chips", "fish &amp;amp;amp; chips", "&lt;b&gt;bold&lt;/b&gt;",
    "<b>bold</b> & <i>italic</i>", "it&#39;s &quot;quoted&quot;", "a&nbsp;b", "&#x1F600; grin", "&hearts; &copy; &euro;",
    "&notanentity; &amp", "Tom &amp; Jerry <3", "5 &lt; 6 &amp;&amp; 7 &gt; 2", "&#0; &#xD800; odd numeric refs",
]
MOJIBAKE = [
    "cafÃ©", "Ã¼ber", "donâ€™t", "â€œquotedâ€\x9d", "naÃ¯ve cafÃ© rÃ©sumÃ©", "ÃƒÂ© double", "Ã¢â‚¬Å“", "â˜ƒ snowman",
    "Ã©tÃ© Ã  Paris", "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
]
WHITESPACE = [
    " " * 5000 + "a dog", "   leading and trailing   ", "many     inner     spaces", "\t\t\ttabs\t\t\t",
    "\n\n\nnewlines\n\n\n", " \t\n\r mixed \x0b\x0c whitespace \u00a0\u2003\u3000 ", "", " ", "\u3000\u3000",
    "a" + "\u200b" * 300 + "b", "a dog" + " " * 6000 + "and a cat",
]
SURROGATES = ["lone \ud800 high", "lone \udfff low", "pair as code units \ud83d\ude00", "reversed \ude00\ud83d",
              "\udc80\udcff surrogateescape bytes", "private use \ue000 \U000f0000", "noncharacters \uffff \U0010ffff"]


def long_texts(rng: random.Random) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while red kettles boil on wooden tables".split()
    out = [" ".join(rng.choice(words) for _ in range(n)) for n in (70, 74, 75, 76, 77, 78, 120, 400)]
    out += ["supercalifragilisticexpialidocious " * 40, "antidisestablishmentarianism" * 30,
            "!" * 500, "1234567890" * 60, "word " * 3000, "🎉" * 200, "a" * 6000 + " b"]
    return out


def random_texts(rng: random.Random, n: int) -> list[str]:
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n", ".,;:!?'\"()-_/&#@*",
             "éüßçøåñ", "αβγδεΣς", "абвгд", "中文字漢", "あいうアイウ", "😀🐶🍕🚀❤", "\u200d\u200b\u00ad\ufe0f",
             "&amp;&lt;&#39;"]
    out = []
    for _ in range(n):
        text = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60)))
        out.append(text)
    return out


def captions() -> list[str]:
    rng = random.Random(13)
    texts = PLAIN + PUNCTUATION + UNICODE + EMOJI + INVISIBLE + HTML + MOJIBAKE + WHITESPACE + SURROGATES
    texts += long_texts(rng) + random_texts(rng, 60)
    specials = ("<start_of_text>", "<end_of_text>")
    return [t for t in texts if not any(s in t.lower() for s in specials)]


def token_reference() -> dict:
    texts = captions()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # OpenAI's tokenizer (SimpleTokenizer)
    ids = tokenizer(texts, context_length=CONTEXT).tolist()
    rows = [row[:row.index(tokenizer.eot_token_id) + 1] for row in ids]
    over = sum(len(tokenizer.encode(t)) + 2 > CONTEXT for t in texts)
    return {"made_by": f"open_clip {open_clip.__version__}: get_tokenizer('ViT-B-32')(captions, {CONTEXT})",
            "context_length": CONTEXT, "longer_than_context": over, "captions": texts, "ids": rows}


PHOTO_SIZES = [(640, 480), (800, 600), (1024, 768), (4032, 3024), (3024, 4032), (1920, 1080), (1080, 1920),
               (1280, 720), (3000, 2000), (2000, 3000), (2560, 1080), (500, 375), (375, 500), (500, 333),
               (333, 500), (640, 427), (612, 612), (1000, 1001), (224, 224), (100, 3000), (7, 5)]
RESIZE_TO = [224, 336, 288, 64]


def resize_reference() -> dict:
    sizes = []
    for w, h in PHOTO_SIZES:
        for s in RESIZE_TO:
            out = transforms.Resize(s, interpolation=transforms.InterpolationMode.BICUBIC)(Image.new("RGB", (w, h)))
            sizes.append({"input": [w, h], "size": s, "output": list(out.size)})
    return {"made_by": f"torchvision {torchvision.__version__} transforms.Resize(size, BICUBIC) on PIL images",
            "sizes": sizes}


def reference_image(width: int, height: int) -> Image.Image:
    """Smooth colour gradients with a few stripes: every output pixel depends on the resize arithmetic."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / (width - 1)
    g = 255 * y / (height - 1)
    b = 127.5 * (1 + np.sin(x / 3.0) * np.cos(y / 5.0))
    return Image.fromarray(np.stack([r, g, b], axis=-1).round().astype(np.uint8), mode="RGB")


def preprocess_reference() -> dict:
    preprocess = open_clip.image_transform(32, is_train=False)
    arrays = {}
    for name, (w, h) in {"landscape": (160, 120), "portrait": (90, 160)}.items():
        image = reference_image(w, h)
        image.save(HERE / f"preprocess_{name}.png")
        arrays[name] = preprocess(Image.open(HERE / f"preprocess_{name}.png")).numpy().astype(np.float32)
    np.savez_compressed(HERE / "preprocess.npz", **arrays)
    return {name: list(a.shape) for name, a in arrays.items()}


def main() -> int:
    tokens = token_reference()
    texts = tokens.pop("captions")
    rows = ",\n".join(json.dumps([text, ids]) for text, ids in zip(texts, tokens.pop("ids")))
    header = json.dumps(tokens)[:-1]  # one caption and its ids per line (ASCII: lone surrogates survive)
    (HERE / "tokens.json").write_text(f'{header}, "rows": [\n{rows}\n]}}\n')
    (HERE / "resize.json").write_text(json.dumps(resize_reference(), indent=1) + "\n")
    shapes = preprocess_reference()
    print(f"{len(texts)} captions ({tokens['longer_than_context']} longer than {CONTEXT} tokens), "
          f"preprocessed {shapes}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
