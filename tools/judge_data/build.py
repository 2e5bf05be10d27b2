"""Build the judge's validation set: hand-written + composed + labelled model completions -> dev/test JSONL.

    python tools/judge_data/build.py        # writes agl/driftcaps/data/judge/{dev,test}.jsonl

Sources (all labelled against docs/JUDGE.md):
* ``hand_*.txt``: hand-written completions, blocks ``=== <style> <R|C> <prompt>`` followed by the completion;
* ``styles_*.txt``: the same format, written later in the manner of other chat models (lecture-style refusals,
  refusals without refusal words, moralising compliance); source ``handwritten-styles``;
* ``compose.py``: hand-written openers x bodies (structure varied independently of wording);
* ``model_labelled.jsonl``: completions of the project's model at several stages (``tools/judge_generate.py``),
  each read and labelled by hand (fields ``id, stage, prompt_id, completion, label, style, note``).

The split is stratified by (source, style): within each stratum rows are shuffled with a fixed seed and dealt
alternately to dev and test, so both splits hold every style of every source in the same proportion. Each batch
of data (the first set; ``styles_*.txt``) is split on its own and appended, so adding a batch never moves a row of
an earlier batch between dev and test.
"""
from __future__ import annotations

import random
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from agl._io import read_jsonl, write_jsonl  # noqa: E402
from compose import composed_rows  # noqa: E402

OUT = REPO / "agl" / "driftcaps" / "data" / "judge"
LABELS = {"R": "refusal", "C": "compliance"}
HEADER = re.compile(r"^=== (\S+) ([RC]) (.+)$")


def handwritten_rows(pattern: str = "hand_*.txt", source: str = "handwritten") -> list[dict]:
    rows = []
    for path in sorted(HERE.glob(pattern)):
        blocks = []
        for line in path.read_text(encoding="utf-8").splitlines():
            m = HEADER.match(line)
            if m:
                blocks.append([m.groups(), []])
            elif line.startswith("==="):
                raise ValueError(f"{path.name}: malformed header {line!r}")
            elif blocks:
                blocks[-1][1].append(line)
        for j, ((style, lab, prompt), body) in enumerate(blocks):
            text = "\n".join(body).strip()
            if not text:
                raise ValueError(f"{path.name}: block {j} ({style} {prompt}) has no completion")
            kind = "unsafe" if style not in {"plain_compliance", "benign_scary", "safety_advice_compliance",
                                              "over_refusal", "capability_then_answer", "long_compliance",
                                              "cant_in_compliant", "honest_unknown", "compliance_mid_caveat"} \
                else "safe"
            rows.append({"id": f"hand:{path.stem}:{j:03d}", "prompt": prompt, "completion": text,
                         "label": LABELS[lab], "style": style, "source": source, "prompt_kind": kind,
                         "note": ""})
    return rows


def model_rows() -> list[dict]:
    path = HERE / "model_labelled.jsonl"
    if not path.exists():
        return []
    out = []
    for r in read_jsonl(path):
        if r.get("label") not in ("refusal", "compliance"):
            continue  # empty outputs are not labelled (docs/JUDGE.md)
        prompt = f"driftcaps:{r['prompt_id']}" if r.get("prompt_id") else r["prompt"]  # our own prompts only
        out.append({"id": r["id"], "prompt": prompt, "completion": r["completion"],
                    "label": r["label"], "style": r["style"], "source": r["stage"],
                    "prompt_kind": r["prompt_label"], "note": r.get("note", "")})
    return out


def split(rows: list[dict], seed: int = 12) -> tuple[list[dict], list[dict]]:
    strata = defaultdict(list)
    for r in rows:
        strata[(r["source"], r["style"])].append(r)
    rng = random.Random(seed)
    dev, test = [], []
    flip = 0
    for key in sorted(strata):
        group = strata[key]
        rng.shuffle(group)
        for r in group:
            (dev if flip % 2 == 0 else test).append(r)
            flip += 1  # carries across strata so odd-sized strata do not all favour dev
    return dev, test


def main():
    batches, seen = [], set()
    for batch in (handwritten_rows() + composed_rows() + model_rows(),
                  handwritten_rows("styles_*.txt", "handwritten-styles")):
        rows = []
        for r in batch:
            key = re.sub(r"\s+", " ", r["completion"].strip().lower())
            if key not in seen:  # one copy of each text (a short stock refusal written twice, a composed repeat)
                seen.add(key)
                rows.append(r)
        batches.append(rows)
    rows = [r for b in batches for r in b]
    ids = [r["id"] for r in rows]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise SystemExit(f"duplicate ids: {sorted(dup)[:5]}")
    dev, test = [], []
    for b in batches:
        d, t = split(b)
        dev += d
        test += t
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "dev.jsonl", dev)
    write_jsonl(OUT / "test.jsonl", test)
    print(f"{len(rows)} rows: dev {len(dev)}, test {len(test)}")


if __name__ == "__main__":
    main()
