"""Language identification on short captions: per-language precision / recall and captions/s.

    .venv/bin/python benchmarks/bench_langid.py [--methods cascade,lingua,fasttext]

Reads the labelled evaluation set (components/filter/data/langid_eval.tsv: 500 English and 100 each
of 12 other languages, 3-12 words) and runs each identifier of components/filter/langid.py on it in
one process. Prints, per method: captions/s (after a warm-up that loads the models, reported apart),
per-language precision and recall, and the filter's rule with only English allowed: the share of
English captions lost (goal <= 1 %) and of other languages rejected (goal >= 95 %).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.filter.langid import METHODS, LanguageIdentifier, load_eval_set  # noqa: E402


def run(method: str, rows: list[tuple[str, str]]) -> None:
    ident = LanguageIdentifier(method, allowed=("en",))  # the default preset's rule
    t = time.perf_counter()
    for _, text in rows:  # a first pass loads every model the set needs
        ident.identify(text)
    warm = time.perf_counter() - t
    ident.lingua_calls = 0
    t = time.perf_counter()
    predicted = [ident.identify(text)[0] for _, text in rows]
    elapsed = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n== {method}: {len(rows) / elapsed:,.0f} captions/s on one core "
          f"(first pass, loading the models: {warm:.1f}s; "
          f"lingua on {ident.lingua_calls / len(rows):.0%} of captions; process peak RSS {rss:,.0f} MB)")
    english = [text for lang, text in rows if lang == "en"]
    ident.lingua_calls = 0
    t = time.perf_counter()
    for text in english:
        ident.identify(text)
    print(f"   on the English captions alone (English-heavy web data): {len(english) / (time.perf_counter() - t):,.0f} "
          f"captions/s, lingua on {ident.lingua_calls / len(english):.0%}")
    gold = [lang for lang, _ in rows]
    print(f"{'language':>8} {'n':>5} {'precision':>9} {'recall':>7}  most common mistakes")
    for lang in sorted(set(gold), key=lambda x: (x != "en", x)):
        tp = sum(g == p == lang for g, p in zip(gold, predicted))
        n_pred = sum(p == lang for p in predicted)
        n_gold = gold.count(lang)
        wrong = Counter(p or "?" for g, p in zip(gold, predicted) if g == lang and p != lang).most_common(3)
        print(f"{lang:>8} {n_gold:>5} {tp / n_pred if n_pred else 0:>9.3f} {tp / n_gold:>7.3f}  "
              + ", ".join(f"{p} x{c}" for p, c in wrong))
    en_lost = sum(g == "en" and p != "en" for g, p in zip(gold, predicted))
    foreign = [(g, p) for g, p in zip(gold, predicted) if g != "en"]
    passed = sum(p == "en" for _, p in foreign)
    print(f"English only: {en_lost}/{gold.count('en')} English lost ({en_lost / gold.count('en'):.1%}, goal <= 1%), "
          f"{len(foreign) - passed}/{len(foreign)} other languages rejected "
          f"({(len(foreign) - passed) / len(foreign):.1%}, goal >= 95%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    args = ap.parse_args()
    rows = load_eval_set()
    print(f"{len(rows)} captions, {len({lang for lang, _ in rows})} languages")
    for method in args.methods.split(","):
        run(method, rows)


if __name__ == "__main__":
    main()
