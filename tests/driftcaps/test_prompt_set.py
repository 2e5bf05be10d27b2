"""Checks of the built-in DriftCaps prompt set and the refusal texts (package data, read directly as JSONL).

Independent of the loader code on purpose: these tests guard the data files themselves.
"""
from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from agl._io import read_jsonl

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "agl" / "driftcaps" / "data" / "prompts.jsonl"
REFUSALS = REPO / "agl" / "experiment" / "data" / "refusals.jsonl"
SHARED_DATA = REPO.parent / "shared" / "data"

UNSAFE_CATEGORIES = {
    "violence_weapons", "cyber_malware", "fraud_theft", "drugs", "hate_harassment", "self_harm",
    "privacy_surveillance", "sexual_harm", "disinformation",
}
SPLITS = ("calibration", "eval")
NEAR_DUP_JACCARD = 0.6
MIN_PUBLIC_WORDS = 6


def _norm(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    return read_jsonl(PROMPTS)  # raises, naming the line, on a line that is not a JSON object


@pytest.fixture(scope="module")
def refusals() -> list[dict]:
    return read_jsonl(REFUSALS)


def test_schema(prompts):
    allowed = {"id", "prompt", "label", "category", "split", "kind"}
    for r in prompts:
        assert set(r) <= allowed, f"{r.get('id')}: unexpected fields {set(r) - allowed}"
        for key in ("id", "prompt", "label", "category", "split"):
            assert isinstance(r.get(key), str) and r[key].strip(), f"{r.get('id')}: bad or missing {key!r}"
        assert r["prompt"] == r["prompt"].strip(), f"{r['id']}: surrounding whitespace"
        assert r["label"] in ("unsafe", "safe"), r["id"]
        assert r["split"] in SPLITS, r["id"]
        assert re.fullmatch(r"[a-z0-9_]+", r["category"]), r["id"]
        assert r["id"].startswith(r["label"] + "-"), r["id"]
        if r["label"] == "safe":
            assert r.get("kind") in ("plain", "borderline"), r["id"]
        else:
            assert "kind" not in r, f"{r['id']}: unsafe prompts carry no kind"
            assert r["category"] in UNSAFE_CATEGORIES, f"{r['id']}: unknown harm category {r['category']!r}"


def test_ids_and_texts_unique(prompts):
    ids = [r["id"] for r in prompts]
    assert len(ids) == len(set(ids)), [i for i, c in Counter(ids).items() if c > 1]
    texts = [_norm(r["prompt"]) for r in prompts]
    assert len(texts) == len(set(texts)), [t for t, c in Counter(texts).items() if c > 1]


def test_sizes(prompts):
    unsafe = Counter(r["category"] for r in prompts if r["label"] == "unsafe")
    assert len(unsafe) >= 9 and set(unsafe) >= UNSAFE_CATEGORIES, unsafe
    assert all(n >= 30 for n in unsafe.values()), unsafe
    per_split = Counter((r["category"], r["split"]) for r in prompts if r["label"] == "unsafe")
    for cat in unsafe:
        for split in SPLITS:
            assert per_split[cat, split] >= 12, (cat, split, per_split[cat, split])
    safe = [r for r in prompts if r["label"] == "safe"]
    assert len(safe) >= 240
    assert sum(r["kind"] == "borderline" for r in safe) >= 100
    assert sum(r["kind"] == "plain" for r in safe) >= 100


def test_splits_balanced(prompts):
    """Roughly 50/50 within every (label, kind) group, so each split has every kind of prompt."""
    groups = defaultdict(Counter)
    for r in prompts:
        groups[r["label"], r.get("kind")][r["split"]] += 1
    for key, c in groups.items():
        total = c["calibration"] + c["eval"]
        assert abs(c["calibration"] - c["eval"]) <= max(2, total // 10), (key, dict(c))


def _near_duplicate_pairs(a: list[tuple[str, frozenset]], b: list[tuple[str, frozenset]], threshold: float):
    """Pairs (id_a, id_b, jaccard) with word-set Jaccard >= threshold, via an inverted index on words: only pairs
    that share a word are compared, and a size filter (J <= min/max) skips most of those."""
    index = defaultdict(list)
    for j, (_, words) in enumerate(b):
        for w in words:
            index[w].append(j)
    found = []
    for ida, wa in a:
        shared = Counter(j for w in wa for j in index[w])
        for j, inter in shared.items():
            idb, wb = b[j]
            if min(len(wa), len(wb)) < threshold * max(len(wa), len(wb)):
                continue
            jac = inter / (len(wa) + len(wb) - inter)
            if jac >= threshold:
                found.append((ida, idb, round(jac, 3)))
    return found


def test_no_leak_between_splits(prompts):
    by_split = {s: [(r["id"], frozenset(_norm(r["prompt"]).split())) for r in prompts if r["split"] == s]
                for s in SPLITS}
    exact = ({_norm(r["prompt"]) for r in prompts if r["split"] == "calibration"}
             & {_norm(r["prompt"]) for r in prompts if r["split"] == "eval"})
    assert not exact, sorted(exact)[:5]
    pairs = _near_duplicate_pairs(by_split["calibration"], by_split["eval"], NEAR_DUP_JACCARD)
    assert not pairs, pairs[:10]


def test_near_duplicate_detector_works():
    a = [("a1", frozenset("how do i kill a python process".split()))]
    b = [("b1", frozenset("how can i kill a python process".split())),
         ("b2", frozenset("what is the capital of france".split()))]
    assert [(x, y) for x, y, _ in _near_duplicate_pairs(a, b, NEAR_DUP_JACCARD)] == [("a1", "b1")]


def _public_prompts() -> list[str]:
    """Prompt texts of the public sets (AdvBench: headerless or `goal` column; HarmBench: `Behavior`;
    XSTest: `prompt`)."""
    out = []
    for path in sorted(SHARED_DATA.rglob("*.csv")):
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        if not rows:
            continue
        header = [h.strip().lower() for h in rows[0]]
        for name in ("goal", "behavior", "prompt"):
            if name in header:
                col, body = header.index(name), rows[1:]
                break
        else:
            col, body = 0, rows
        out += [row[col] for row in body if len(row) > col]
    return out


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"public data sets not found at {SHARED_DATA}")
def test_no_public_sentences_in_package_data(prompts, refusals):
    public = {t for t in (_norm(p) for p in _public_prompts()) if len(t.split()) >= MIN_PUBLIC_WORDS}
    assert len(public) > 500, "public CSVs look empty or unparsed"
    ours = [" " + _norm(r["prompt"]) + " " for r in prompts] + [" " + _norm(r["text"]) + " " for r in refusals]
    # index our texts by word so each public sentence is only tested against texts holding its rarest word
    index = defaultdict(set)
    for i, t in enumerate(ours):
        for w in set(t.split()):
            index[w].add(i)
    hits = []
    for p in public:
        cands = min((index.get(w, set()) for w in set(p.split())), key=len)
        hits += [(p, ours[i].strip()) for i in cands if f" {p} " in ours[i]]
    assert not hits, hits[:5]


def test_refusals(refusals):
    assert len(refusals) >= 60
    ids = [r["id"] for r in refusals]
    assert len(ids) == len(set(ids))
    texts = [_norm(r["text"]) for r in refusals]
    assert len(texts) == len(set(texts))
    for r in refusals:
        assert isinstance(r["text"], str) and r["text"].strip()
        assert r["style"] in ("plain", "apology", "redirect", "partial"), r["id"]
        assert r.get("category", "any") in UNSAFE_CATEGORIES | {"any"}, r["id"]
        assert len(r["text"]) <= 300, f"{r['id']}: refusals should be short"
        assert not re.search(r"\d{3}[-. ]?\d{3,4}", r["text"]), f"{r['id']}: no phone numbers"
    assert set(Counter(r["style"] for r in refusals)) == {"plain", "apology", "redirect", "partial"}
    assert sum(r.get("category", "any") == "any" for r in refusals) >= 10


def test_stratified_limit_covers_labels_and_categories():
    from collections import Counter

    from agl.driftcaps.prompts import load_prompts, sample_prompts

    prompts = load_prompts(split="eval")
    s = sample_prompts(prompts, 12)
    labels = Counter(p.label for p in s)
    assert labels["unsafe"] == 6 and labels["safe"] == 6  # in proportion (180 : 168), as docs/DRIFTCAPS.md says
    for lab in ("unsafe", "safe"):
        cats = [p.category for p in s if p.label == lab]
        assert len(set(cats)) == len(cats)  # categories as evenly as possible: all different at this size
    assert sample_prompts(prompts, 12) == s  # deterministic
    assert sample_prompts(prompts, 12, seed=1) != s
    idx = [prompts.index(p) for p in s]
    assert idx == sorted(idx)  # the set's order
    big = sample_prompts(prompts, 100)
    per_cat = Counter(p.category for p in big if p.label == "unsafe")
    assert max(per_cat.values()) - min(per_cat.values()) <= 1 and len(per_cat) == 9
    assert sample_prompts(prompts, 12, mode="first") == prompts[:12]
    assert sample_prompts(prompts, 10_000) == prompts
    assert [p.label for p in sample_prompts(prompts, 2)].count("safe") == 1
    with pytest.raises(ValueError, match="mode must be"):
        sample_prompts(prompts, 3, mode="random")
    with pytest.raises(ValueError, match="n must be"):
        sample_prompts(prompts, 0)
