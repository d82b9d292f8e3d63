"""Write `langid_eval.tsv`: short labelled captions (3-12 words) for measuring language identification.

    python components/filter/data/make_langid_eval.py      # rewrites langid_eval.tsv beside this file

Web alt-text is short: "a photo of a rusty bicycle on a snowy street". Identifiers trained on
sentences get such captions wrong (fastText lid.176 calls that one Polish), so the filter's language
rule is chosen and checked on captions of this kind. Each language has its own noun phrases, places,
endings and templates (written for that language, not translated word for word); English, the
language the default preset keeps, gets several caption styles (photo captions, scene descriptions,
stock-photo and product titles, art styles) and the most rows. Deterministic: a fixed seed, so the
committed file is reproducible; the file is project data (tests and benchmarks/bench_langid.py read it).
"""

from __future__ import annotations

import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "langid_eval.tsv"
PER_LANGUAGE = 100
ENGLISH = 500
SEED = 11

# --------------------------------------------------------------------------- English

EN_ADJ = ["rusty", "old", "red", "wooden", "tiny", "golden", "vintage", "broken", "shiny", "colorful", "empty",
          "crowded", "quiet", "wet", "frozen", "bright", "dark", "modern", "abandoned", "fluffy", "huge", "small",
          "green", "white", "black", "blue", "yellow", "pink", "handmade", "antique", "snowy", "misty", "weathered",
          "cozy", "sunlit", "muddy", "striped", "polished", "crooked", "dusty"]
EN_NOUN = ["bicycle", "dog", "cat", "car", "house", "boat", "bridge", "tree", "chair", "lamp", "guitar", "cake",
           "cup of coffee", "train", "horse", "lighthouse", "church", "teddy bear", "umbrella", "kitchen",
           "mountain cabin", "street market", "garden", "bookshelf", "motorcycle", "sailboat", "pizza", "bird",
           "window", "wedding dress", "pair of shoes", "bowl of soup", "fire truck", "windmill", "castle"]
EN_PLURAL = ["dogs", "children", "people", "cars", "flowers", "books", "apples", "birds", "sheep", "boats",
             "houses", "friends", "cyclists", "tourists", "cookies", "tulips", "candles", "horses"]
EN_PLACE = ["on a snowy street", "in the park", "on the beach", "in the kitchen", "by the lake", "in a forest",
            "on a wooden table", "in the city", "at the station", "on the grass", "in the rain", "near the river",
            "on a white background", "in a small village", "on the roof", "at the market", "in the desert",
            "under a bridge", "in front of the house", "on a country road", "in the snow", "at the harbor",
            "on the balcony", "in an old library", "next to the window", "on a cobblestone street", "in a misty valley",
            "on a foggy pier", "along a sandy path", "in a snowy field", "on a rainy sidewalk", "by the fireplace",
            "in a sunflower field", "at the bus stop", "on a mossy rock"]
EN_TIME = ["at sunset", "at night", "in the morning", "in winter", "during the summer", "after the rain",
           "at dawn", "in autumn", "on a sunny day", "in the fog"]
EN_VERB = ["playing", "sleeping", "running", "sitting", "walking", "standing", "waiting", "dancing", "eating lunch",
           "reading a book", "riding bikes", "having a picnic"]
EN_STYLE = ["watercolor painting of", "black and white photo of", "illustration of", "close-up of",
            "aerial view of", "oil painting of", "vintage poster of", "sketch of", "3d render of", "portrait of"]
EN_PRODUCT = ["leather wallet", "running shoes", "coffee mug", "cotton t-shirt", "wireless headphones",
              "wooden desk", "kitchen knife set", "winter jacket", "ceramic vase", "yoga mat", "desk lamp",
              "backpack", "wall clock", "throw pillow", "sunglasses"]
EN_PRODUCT_TAIL = ["for men", "for women", "size 8", "isolated on white", "free shipping", "black", "brown",
                   "set of 2", "with gift box", "large", "new in box", "handmade in italy"]
EN_TEMPLATES = [
    "a photo of a {adj} {noun} {place}", "a {adj} {noun} {place}", "{adj} {noun} {place} {time}",
    "the {adj} {noun} {place}", "a picture of a {noun} {place}", "an image of a {adj} {noun}",
    "{plural} {verb} {place}", "two {plural} {verb} {place} {time}", "a group of {plural} {verb} {place}",
    "{style} a {adj} {noun}", "{style} a {noun} {place}", "{style} {plural} {place}",
    "{product} {tail}", "{adj} {product} {tail}", "my {noun} {place}", "our {adj} {noun} {time}",
    "view of the {noun} {place}", "a {noun} {place} {time}", "there is a {adj} {noun} {place}",
    "this {adj} {noun} was found {place}", "{plural} {place}", "a man with a {noun} {place}",
    "a woman holding a {adj} {noun}", "a child {verb} {place}", "stock photo of a {adj} {noun}",
]


def english(rng: random.Random) -> str:
    text = rng.choice(EN_TEMPLATES).format(
        adj=rng.choice(EN_ADJ), noun=rng.choice(EN_NOUN), plural=rng.choice(EN_PLURAL), place=rng.choice(EN_PLACE),
        time=rng.choice(EN_TIME), verb=rng.choice(EN_VERB), style=rng.choice(EN_STYLE),
        product=rng.choice(EN_PRODUCT), tail=rng.choice(EN_PRODUCT_TAIL))
    return text


# --------------------------------------------------------------------------- other languages
# Per language: subjects (complete noun phrases, so no agreement is needed), places, endings, templates.

LANGS: dict[str, dict[str, list[str]]] = {
    "de": {
        "subj": ["ein rostiges Fahrrad", "zwei Katzen", "eine alte Frau", "ein kleiner Hund", "ein rotes Auto",
                 "eine Tasse Kaffee", "ein Holzhaus", "drei Kinder", "ein Segelboot", "eine Kirche",
                 "ein Leuchtturm", "frische Erdbeeren", "ein alter Mann", "eine Windmühle", "zwei Pferde"],
        "place": ["auf einer verschneiten Straße", "im Park", "am Strand", "in der Küche", "am See", "im Wald",
                  "auf dem Tisch", "in der Stadt", "am Bahnhof", "auf der Wiese"],
        "time": ["bei Sonnenuntergang", "im Winter", "am Morgen", "in der Nacht", "nach dem Regen", "im Herbst"],
        "tpl": ["{subj} {place}", "{subj} {place} {time}", "Foto: {subj} {place}", "Hier sieht man {subj} {place}",
                "Unser Urlaub: {subj} {place}", "{subj} {time}", "Schönes Bild, {subj} {place}"],
    },
    "fr": {
        "subj": ["un vélo rouillé", "deux chats", "une vieille femme", "un petit chien", "une voiture rouge",
                 "une tasse de café", "une maison en bois", "trois enfants", "un voilier", "une église",
                 "un phare", "des fraises fraîches", "un vieil homme", "un moulin à vent", "deux chevaux"],
        "place": ["dans une rue enneigée", "au parc", "sur la plage", "dans la cuisine", "près du lac",
                  "dans la forêt", "sur la table", "en ville", "à la gare", "dans le jardin"],
        "time": ["au coucher du soleil", "en hiver", "le matin", "pendant la nuit", "après la pluie",
                 "en automne"],
        "tpl": ["{subj} {place}", "{subj} {place} {time}", "photo : {subj} {place}", "voici {subj} {place}",
                "nos vacances : {subj} {place}", "{subj} {time}", "très belle image, {subj} {place}"],
    },
    "es": {
        "subj": ["una bicicleta oxidada", "dos gatos", "una mujer mayor", "un perro pequeño", "un coche rojo",
                 "una taza de café", "una casa de madera", "tres niños", "un velero", "una iglesia",
                 "un faro", "fresas frescas", "un hombre mayor", "un molino de viento", "dos caballos"],
        "place": ["en una calle nevada", "en el parque", "en la playa", "en la cocina", "junto al lago",
                  "en el bosque", "sobre la mesa", "en la ciudad", "en la estación", "en el jardín"],
        "time": ["al atardecer", "en invierno", "por la mañana", "de noche", "después de la lluvia", "en otoño"],
        "tpl": ["{subj} {place}", "{subj} {place} {time}", "foto: {subj} {place}", "aquí se ve {subj} {place}",
                "nuestras vacaciones: {subj} {place}", "{subj} {time}", "qué bonita imagen, {subj} {place}"],
    },
    "it": {
        "subj": ["una bicicletta arrugginita", "due gatti", "una donna anziana", "un cane piccolo",
                 "una macchina rossa", "una tazza di caffè", "una casa di legno", "tre bambini", "una barca a vela",
                 "una chiesa", "un faro", "fragole fresche", "un uomo anziano", "un mulino a vento", "due cavalli"],
        "place": ["in una strada innevata", "nel parco", "sulla spiaggia", "in cucina", "vicino al lago",
                  "nel bosco", "sul tavolo", "in città", "alla stazione", "nel giardino"],
        "time": ["al tramonto", "d'inverno", "di mattina", "di notte", "dopo la pioggia", "in autunno"],
        "tpl": ["{subj} {place}", "{subj} {place} {time}", "foto: {subj} {place}", "ecco {subj} {place}",
                "le nostre vacanze: {subj} {place}", "{subj} {time}", "che bella immagine, {subj} {place}"],
    },
    "pt": {
        "subj": ["uma bicicleta enferrujada", "dois gatos", "uma senhora idosa", "um cão pequeno",
                 "um carro vermelho", "uma chávena de café", "uma casa de madeira", "três crianças", "um veleiro",
                 "uma igreja", "um farol", "morangos frescos", "um homem idoso", "um moinho de vento",
                 "dois cavalos"],
        "place": ["numa rua coberta de neve", "no parque", "na praia", "na cozinha", "perto do lago",
                  "na floresta", "em cima da mesa", "na cidade", "na estação", "no jardim"],
        "time": ["ao pôr do sol", "no inverno", "de manhã", "à noite", "depois da chuva", "no outono"],
        "tpl": ["{subj} {place}", "{subj} {place} {time}", "foto: {subj} {place}", "aqui vemos {subj} {place}",
                "as nossas férias: {subj} {place}", "{subj} {time}", "que imagem bonita, {subj} {place}"],
    },
    "nl": {
        "subj": ["een roestige fiets", "twee katten", "een oude vrouw", "een kleine hond", "een rode auto",
                 "een kop koffie", "een houten huis", "drie kinderen", "een zeilboot", "een kerk",
                 "een vuurtoren", "verse aardbeien", "een oude man", "een windmolen", "twee paarden"],
        "place": ["in een besneeuwde straat", "in het park", "op het strand", "in de keuken", "bij het meer",
                  "in het bos", "op de tafel", "in de stad", "op het station", "in de tuin"],
        "time": ["bij zonsondergang", "in de winter", "in de ochtend", "'s nachts", "na de regen", "in de herfst"],
        "tpl": ["{subj} {place}", "{subj} {place} {time}", "foto: {subj} {place}", "hier zie je {subj} {place}",
                "onze vakantie: {subj} {place}", "{subj} {time}", "mooi plaatje, {subj} {place}"],
    },
    "pl": {
        "subj": ["zardzewiały rower", "dwa koty", "starsza kobieta", "mały pies", "czerwony samochód",
                 "filiżanka kawy", "drewniany dom", "troje dzieci", "żaglówka", "stary kościół", "latarnia morska",
                 "świeże truskawki", "starszy mężczyzna", "wiatrak", "dwa konie"],
        "place": ["na zaśnieżonej ulicy", "w parku", "na plaży", "w kuchni", "nad jeziorem", "w lesie",
                  "na stole", "w mieście", "na dworcu", "w ogrodzie"],
        "time": ["o zachodzie słońca", "zimą", "rano", "w nocy", "po deszczu", "jesienią"],
        "tpl": ["{subj} {place}", "{subj} {place} {time}", "zdjęcie: {subj} {place}", "tutaj widać {subj} {place}",
                "nasze wakacje: {subj} {place}", "{subj} {time}", "piękny widok, {subj} {place}"],
    },
    "sv": {
        "subj": ["en rostig cykel", "två katter", "en gammal kvinna", "en liten hund", "en röd bil",
                 "en kopp kaffe", "ett trähus", "tre barn", "en segelbåt", "en kyrka", "en fyr",
                 "färska jordgubbar", "en gammal man", "en väderkvarn", "två hästar"],
        "place": ["på en snöig gata", "i parken", "på stranden", "i köket", "vid sjön", "i skogen", "på bordet",
                  "i staden", "på stationen", "i trädgården"],
        "time": ["vid solnedgången", "på vintern", "på morgonen", "på natten", "efter regnet", "på hösten"],
        "tpl": ["{subj} {place}", "{subj} {place} {time}", "foto: {subj} {place}", "här ser man {subj} {place}",
                "vår semester: {subj} {place}", "{subj} {time}", "fin bild, {subj} {place}"],
    },
    "tr": {
        "subj": ["paslı bir bisiklet", "iki kedi", "yaşlı bir kadın", "küçük bir köpek", "kırmızı bir araba",
                 "bir fincan kahve", "ahşap bir ev", "üç çocuk", "bir yelkenli", "eski bir cami", "bir deniz feneri",
                 "taze çilekler", "yaşlı bir adam", "bir yel değirmeni", "iki at"],
        "place": ["karlı bir sokakta", "parkta", "sahilde", "mutfakta", "gölün kenarında", "ormanda",
                  "masanın üstünde", "şehirde", "istasyonda", "bahçede"],
        "time": ["gün batımında", "kışın", "sabahleyin", "gece", "yağmurdan sonra", "sonbaharda"],
        "tpl": ["{place} {subj}", "{time} {place} {subj}", "fotoğraf: {place} {subj}", "{place} duran {subj}",
                "tatilimiz: {place} {subj}", "{time} {subj}", "çok güzel bir görüntü, {place} {subj}"],
    },
    "ru": {
        "subj": ["ржавый велосипед", "две кошки", "пожилая женщина", "маленькая собака", "красная машина",
                 "чашка кофе", "деревянный дом", "трое детей", "парусная лодка", "старая церковь", "маяк",
                 "свежая клубника", "пожилой мужчина", "ветряная мельница", "две лошади"],
        "place": ["на заснеженной улице", "в парке", "на пляже", "на кухне", "у озера", "в лесу", "на столе",
                  "в городе", "на вокзале", "в саду"],
        "time": ["на закате", "зимой", "утром", "ночью", "после дождя", "осенью"],
        "tpl": ["{subj} {place}", "{subj} {place} {time}", "фото: {subj} {place}", "здесь видно, как {subj} {place}",
                "наш отпуск: {subj} {place}", "{subj} {time}", "красивый снимок, {subj} {place}"],
    },
    "zh": {
        "subj": ["一辆生锈的自行车", "两只猫", "一位老奶奶", "一只小狗", "一辆红色的汽车", "一杯咖啡",
                 "一座木房子", "三个孩子", "一艘帆船", "一座教堂", "一座灯塔", "新鲜的草莓", "一位老人",
                 "一座风车", "两匹马"],
        "place": ["在下雪的街道上", "在公园里", "在海滩上", "在厨房里", "在湖边", "在森林里", "在桌子上",
                  "在城市里", "在火车站", "在花园里"],
        "time": ["日落时", "冬天", "早上", "夜里", "雨后", "秋天"],
        "tpl": ["{place}的{subj}", "{time}{place}的{subj}", "照片：{place}的{subj}", "{subj}{place}",
                "我们的假期：{place}的{subj}", "{time}的{subj}", "很美的画面，{place}的{subj}"],
    },
    "ja": {
        "subj": ["錆びた自転車", "二匹の猫", "年配の女性", "小さな犬", "赤い車", "一杯のコーヒー", "木造の家",
                 "三人の子供", "ヨット", "古い教会", "灯台", "新鮮なイチゴ", "年配の男性", "風車", "二頭の馬"],
        "place": ["雪の積もった通りの", "公園の", "浜辺の", "台所の", "湖のそばの", "森の中の", "テーブルの上の",
                  "街の", "駅の", "庭の"],
        "time": ["夕焼けの", "冬の", "朝の", "夜の", "雨上がりの", "秋の"],
        "tpl": ["{place}{subj}", "{time}{place}{subj}", "写真：{place}{subj}", "{place}{subj}です",
                "私たちの休暇：{place}{subj}", "{time}{subj}", "とてもきれいな写真、{place}{subj}"],
    },
}


def other(lang: str, rng: random.Random) -> str:
    v = LANGS[lang]
    return rng.choice(v["tpl"]).format(subj=rng.choice(v["subj"]), place=rng.choice(v["place"]),
                                       time=rng.choice(v["time"]))


def _ok(text: str, lang: str) -> bool:
    """3-12 words (languages written without spaces: 4-40 characters)."""
    if lang in ("zh", "ja"):
        return 4 <= len(text) <= 40
    return 3 <= len(text.split()) <= 12


def build(seed: int = SEED) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    for lang, count in [("en", ENGLISH)] + [(lang, PER_LANGUAGE) for lang in LANGS]:
        seen: set[str] = set()
        while len(seen) < count:
            text = english(rng) if lang == "en" else other(lang, rng)
            if rng.random() < 0.25:  # web captions: some start upper-case, some end with a full stop
                text = text[0].upper() + text[1:]
            if rng.random() < 0.2 and lang not in ("zh", "ja"):
                text += "."
            if _ok(text, lang) and text.lower() not in seen:
                seen.add(text.lower())
                rows.append((lang, text))
    return rows


def main() -> None:
    rows = build()
    OUT.write_text("language\tcaption\n" + "".join(f"{lang}\t{text}\n" for lang, text in rows), encoding="utf-8")
    print(f"wrote {len(rows)} captions in {len({r[0] for r in rows})} languages to {OUT}")


if __name__ == "__main__":
    main()
