"""Labels: the values a source gives (class names, ``N_name`` folders, integers) as class indices
and names, the rule that ordered them, and the warnings a class set deserves."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.ingest.candidates import Candidate
from transforms.manifest import SPLITS

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NUMBERED = re.compile(r"^(\d+)[\s_.\-]+(\S.*)$")  # 0_normal, 1-pneumonia, 2 covid
_NAME = re.compile(r"[A-Za-z][\w\- ]*")


@dataclass
class Labels:
    of: dict[int, int]  # candidate index -> label (-1 unlabelled)
    name_of: dict[int, str]
    bad: dict[int, str]  # candidate index -> quarantine reason
    rule: str  # how names became indices


def _raw_labels(cands: list[Candidate], free_names: bool) -> tuple[dict[int, Any], dict[int, str]]:
    """Each candidate's label as read: an int, a plain name, a numbered name ``(N, name)`` or None;
    and the unreadable ones with their reason."""
    parsed: dict[int, Any] = {}  # int | str (plain name) | (int, str) (numbered name)
    bad: dict[int, str] = {}
    for i, c in enumerate(cands):
        v = c.label_raw
        if v is None:
            parsed[i] = None
            continue
        if isinstance(v, (int, np.integer)):
            parsed[i] = int(v)
            continue
        s = str(v).strip()
        if s == "" or s.lower() in ("nan", "none", "null"):
            bad[i] = f"unreadable label {v!r}: empty"
            continue
        if _NUMBER.fullmatch(s):
            f = float(s)
            if not math.isfinite(f) or f != int(f) or f < 0:
                bad[i] = f"unreadable label {s!r}: integer labels must be whole numbers >= 0"
            else:
                parsed[i] = int(f)
            continue
        m = _NUMBERED.match(s)
        if m:
            parsed[i] = (int(m.group(1)), m.group(2).strip().lower())
        elif free_names or _NAME.fullmatch(s):
            parsed[i] = s.lower()
        else:
            bad[i] = f"unreadable label {s!r}: neither an integer class nor a class name"
    return parsed, bad


def _numbered_classes(parsed: dict[int, Any]) -> tuple[dict[int, set[str]], dict[str, int]]:
    """The ``N_name`` classes: index -> names, and name -> index; refuses an index with two names
    or a name with two indices."""
    numbered: dict[int, set[str]] = defaultdict(set)
    for v in parsed.values():
        if isinstance(v, tuple):
            numbered[v[0]].add(v[1])
    for j, ns in numbered.items():
        if len(ns) > 1:
            raise ValueError(f"class index {j} is given to more than one name: {sorted(ns)}")
    index_of_name = {next(iter(ns)): j for j, ns in numbered.items()}
    if len(index_of_name) < len(numbered):
        dup = Counter(next(iter(ns)) for ns in numbered.values()).most_common(1)[0][0]
        raise ValueError(
            f"class name {dup!r} is numbered twice ({sorted(j for j, ns in numbered.items() if dup in ns)})"
        )
    return numbered, index_of_name


def parse_labels(cands: list[Candidate], names: list[str] | None, free_names: bool = False) -> Labels:
    """Integer labels and their names. ``free_names``: any text is a class name (folder names);
    otherwise a name must start with a letter. ``N_name`` gives class N named ``name``."""
    parsed, bad = _raw_labels(cands, free_names)
    given = [n.lower() for n in names or []]
    numbered, index_of_name = _numbered_classes(parsed)
    plain = {v for v in parsed.values() if isinstance(v, str)}
    if numbered and plain - set(index_of_name):
        shown = ", ".join(f"{j}_{n}" for j, n in sorted((j, n) for n, j in index_of_name.items()))
        raise ValueError(
            f"labels mix numbered classes ({shown}) "
            f"and plain names ({', '.join(sorted(plain - set(index_of_name)))}): name every class "
            "N_name, or none"
        )
    ints = {v for v in parsed.values() if isinstance(v, int)}
    rule = "integer labels"
    labelled: dict[int, int] = {}
    name_of: dict[int, str] = {}
    if numbered:
        rule = "leading numbers of the class names"
        for i, v in parsed.items():
            if isinstance(v, tuple):
                labelled[i] = v[0]
            elif isinstance(v, str):
                labelled[i] = index_of_name[v]
            elif v is not None:
                labelled[i] = v
        name_of = {j: n for n, j in index_of_name.items()}
    elif plain and ints:
        # Mixed forms: accept names that match label_names, otherwise this is ambiguous.
        lookup = {n: j for j, n in enumerate(given)}
        for i, v in parsed.items():
            if isinstance(v, str):
                if v in lookup:
                    labelled[i] = lookup[v]
                else:
                    bad[i] = f"unreadable label {v!r}: other rows use integer labels"
            elif v is not None:
                labelled[i] = v
    elif plain:
        # 0 = normal by clinical convention when such a class exists; the rest alphabetical
        order = sorted(plain, key=lambda n: (n != "normal", n))
        rule = "'normal' first, then alphabetical"
        if given:
            order = given + [n for n in order if n not in given]
            rule = "label_names"
        index = {n: j for j, n in enumerate(order)}
        labelled = {i: index[v] for i, v in parsed.items() if isinstance(v, str)}
        name_of = {j: n for n, j in index.items() if n in plain or n in given}
    else:
        labelled = {i: v for i, v in parsed.items() if v is not None}
    for j in set(labelled.values()):
        if given and j < len(given):
            name_of[j] = given[j]
        name_of.setdefault(j, str(j))
    if given and rule in ("integer labels", "leading numbers of the class names"):
        rule += " (names from label_names)"
    of = {i: labelled.get(i, -1) for i in parsed if i not in bad}
    return Labels(of, name_of, bad, rule)


def class_warnings(cands: list[Candidate], labels: Labels, todo: list[int], by_split: bool) -> list[str]:
    present = sorted({labels.of[i] for i in todo if labels.of.get(i, -1) >= 0})
    out = []
    if len(present) == 1:
        name = labels.name_of.get(present[0], str(present[0]))
        out.append(
            f"only one class ({name!r}): every labelled image has label {present[0]}; a classifier "
            "cannot learn from one class (if SOURCE is itself a class folder, point at its parent)"
        )
    elif present and present != list(range(len(present))):
        out.append(f"class indices {present} are not 0..{len(present) - 1}: check the class names' numbers")
    if by_split:
        per: dict[str, set[int]] = defaultdict(set)
        for i in todo:
            if labels.of.get(i, -1) >= 0:
                per[cands[i].split or "train"].add(labels.of[i])
        splits = [s for s in SPLITS if s in per]
        for j in present:
            have = [s for s in splits if j in per[s]]
            lack = [s for s in splits if j not in per[s]]
            if lack:
                out.append(
                    f"classes differ between splits: {labels.name_of.get(j, j)!r} is in "
                    f"{', '.join(have)} but not in {', '.join(lack)}"
                )
    return out
