"""Sentence-similarity (STS) data, e.g. BIOSSES: a tsv with sentence1, sentence2 and a gold score."""
from __future__ import annotations

import csv
import math

import numpy as np

from bmretriever_jax.data.beir import DataFormatError, text_lines

REQUIRED = ("sentence1", "sentence2", "score")


def load_sts_tsv(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """Reads a tab-separated file with a header naming at least sentence1, sentence2, score.

    Returns (sentences1 [n], sentences2 [n], gold scores [n] float64). Errors name path:line.
    """
    s1, s2, gold = [], [], []
    # Sentences may contain quotes; this format never quotes fields.
    reader = csv.reader((line for _, line in text_lines(path)), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None:
        raise DataFormatError(f"{path}:1: empty file")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataFormatError(f"{path}:1: header lacks column(s) {missing} (has {header})")
    col = {c: header.index(c) for c in REQUIRED}
    for row in reader:
        lineno = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataFormatError(f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}")
        try:
            score = float(row[col["score"]])
        except ValueError:
            raise DataFormatError(f"{path}:{lineno}: score is not a number: {row[col['score']]!r}") from None
        if not math.isfinite(score):
            raise DataFormatError(f"{path}:{lineno}: score is not finite: {score}")
        s1.append(row[col["sentence1"]])
        s2.append(row[col["sentence2"]])
        gold.append(score)
    if len(gold) < 2:
        raise DataFormatError(f"{path}: {len(gold)} sentence pair(s): a correlation needs at least 2")
    if min(gold) == max(gold):
        raise DataFormatError(f"{path}: every gold score is {gold[0]}: a correlation with constant scores is "
                              "undefined (is the score column the right one?)")
    return s1, s2, np.asarray(gold, dtype=np.float64)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [n, d] and [n, d] -> [n] (float64; a zero row gives 0)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return np.sum(a * b, axis=1) / denom
