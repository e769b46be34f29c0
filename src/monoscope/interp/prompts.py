"""Prompts for `monoscope explain`: the evidence an LLM sees, how it is written, and how answers are read.

Every prompt here is versioned by PROMPT_VERSION, stored with each explanation and score: change a template
and the version, and a rerun re-asks instead of reusing answers to a different question.

Evidence. A context is a window of tokens from the feature database with this feature's activation on
each token. Active tokens (act > 0) are marked `<<like this>>` (runs of active tokens merged into one
span, leading whitespace kept outside the marks), and the explainer also gets each marked token's
activation on a 0-10 scale (10 = the feature's max_act), the notation of Bills et al. 2023 and delphi.
Newlines and tabs are written as visible symbols (⏎ ⇥) so one excerpt stays on one line, and
windows are decoded from token bytes (`monoscope.features.tokens`: a character split across tokens is
written once, on the token that completes it, not as U+FFFD pieces). The explainer
sees the top examples of even rank (10) and one sample per decile (10); the scorers draw from the examples it
did not see (`Evidence.held_out`), so a score measures prediction on contexts the explanation was not written
from.

`evidence_sha256` hashes exactly the evidence text the explainer was shown: a stored explanation is
reused only while its evidence is unchanged (same database, same prompt format).

Answers are read tolerantly: `<think>` blocks are dropped, an `Explanation:` line or the last line is
taken, JSON arrays are found anywhere in the text (bare numbers as a fallback). Anything else is None:
the caller records a failure; nothing here raises on model output.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from monoscope.features.tokens import visible

PROMPT_VERSION = "interp-2"  # interp-2: explanations end with frequent marked tokens
MARK_OPEN, MARK_CLOSE = "<<", ">>"
MAX_EXPLANATION_CHARS = 300  # longer answers are cut at a sentence: an explanation is a phrase, not an essay

# max_tokens per request; generous enough for a short preamble, small enough to stop a rambling model
EXPLAIN_MAX_TOKENS = 400
SPECIFICITY_MAX_TOKENS = 64


@dataclass(frozen=True)
class Context:
    """One window of tokens (text as the tokenizer writes it) with this feature's activation on each."""

    tokens: tuple[str, ...]
    acts: tuple[float, ...]
    context: int  # corpus context id (-1 when unknown)
    kind: str  # "top", "quantile" or "negative"
    bin: int = 0
    act: float = 0.0  # the window's maximum activation
    position: int = 0  # index of that maximum in the window

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def active(self) -> list[int]:
        return [i for i, a in enumerate(self.acts) if a > 0]


@dataclass
class Evidence:
    """What is known of one feature: contexts shown to the explainer, held-out ones for scoring, and
    contexts where it (presumably) does not fire."""

    feature: int
    max_act: float
    explain: list[Context] = field(default_factory=list)
    held_out: list[Context] = field(default_factory=list)
    negatives: list[Context] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- formatting
def level(act: float, max_act: float) -> int:
    """Activation on the 0-10 scale of the prompts; any active token is at least 1."""
    if act <= 0 or max_act <= 0:
        return 0
    return int(min(10, max(1, round(10 * act / max_act))))


def mark(tokens: Sequence[str], marked: Sequence[int] | set[int]) -> str:
    """Tokens on one line with the tokens at `marked` in <<marks>>; adjacent marked tokens share a span."""
    on = set(marked)
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if i not in on:
            out.append(visible(tokens[i]))
            i += 1
            continue
        j = i
        while j < len(tokens) and j in on:
            j += 1
        span = "".join(visible(t) for t in tokens[i:j])
        lead = span[: len(span) - len(span.lstrip(" "))]
        out.append(f"{lead}{MARK_OPEN}{span[len(lead):]}{MARK_CLOSE}")
        i = j
    return "".join(out)


def plain(ctx: Context) -> str:
    """The window as one line, no marks (what detection and embedding see)."""
    return "".join(visible(t) for t in ctx.tokens)


def format_explain_evidence(ev: Evidence) -> str:
    """The evidence block of the explainer prompt (its sha256 is the evidence hash)."""
    blocks = []
    for n, ctx in enumerate(ev.explain, 1):
        act = ctx.active()
        where = "top" if ctx.kind == "top" else f"sample, decile {ctx.bin + 1}"
        levels = ", ".join(f"{json.dumps(visible(ctx.tokens[i]), ensure_ascii=False)} "
                           f"{level(ctx.acts[i], ev.max_act)}" for i in act)
        blocks.append(f"Example {n} ({where}, max {level(ctx.act, ev.max_act)}):\n{mark(ctx.tokens, act)}\n"
                      f"Activations: {levels or 'none'}")
    return "\n\n".join(blocks)


# Compact style (`monoscope explain --prompt compact`, the default for local models): on a 2-core CPU the full
# prompt (20 windows of 64 tokens with activation lists, ~1,400 tokens) takes a 0.5-1.5B model 20-60 s to read
# and small models echo its instructions. Compact shows 10 windows cut around their peak, no activation lists,
# plus the marked tokens by frequency (most features of a small SAE are token-level), in ~400 tokens.
COMPACT_VERSION = PROMPT_VERSION + "-compact"
COMPACT_TOP = 6  # top examples shown (of the explainer's even-rank ones)
COMPACT_QUANTILE = 4  # quantile samples shown
COMPACT_BEFORE, COMPACT_AFTER = 14, 6  # tokens kept before / after each window's peak
COMPACT_COMMON = 6  # most frequent marked tokens listed
COMPACT_MAX_TOKENS = 48
EXPLAIN_STYLES = ("full", "compact")
SUFFIX_TOKENS = 4  # frequent marked tokens named at the end of every explanation (`with_frequent_tokens`)


def _compact_windows(ev: Evidence) -> list[Context]:
    shown = [c for c in ev.explain if c.kind == "top"][:COMPACT_TOP]
    return shown + [c for c in ev.explain if c.kind != "top"][:COMPACT_QUANTILE]


def frequent_marked_tokens(windows: Sequence[Context], n: int) -> list[tuple[str, int]]:
    """The n most frequent active tokens (visible form, stripped) of `windows`, with their counts."""
    from collections import Counter

    count = Counter[str]()
    for c in windows:
        count.update(visible(c.tokens[i]).strip() or visible(c.tokens[i]) for i in c.active())
    return count.most_common(n)


def format_compact_evidence(ev: Evidence) -> str:
    """The compact explainer prompt's evidence: numbered excerpts around each peak, then the marked tokens."""
    lines = []
    windows = _compact_windows(ev)
    for n, c in enumerate(windows, 1):
        lo, hi = max(0, c.position - COMPACT_BEFORE), min(len(c.tokens), c.position + COMPACT_AFTER + 1)
        act = [i - lo for i in c.active() if lo <= i < hi]
        lines.append(f"{n}. {mark(c.tokens[lo:hi], act)}")
    common = ", ".join(f"{json.dumps(t, ensure_ascii=False)} ({k})"
                       for t, k in frequent_marked_tokens(windows, COMPACT_COMMON))
    return "\n".join(lines) + f"\n\nMost frequent marked tokens: {common or 'none'}"


def with_frequent_tokens(phrase: str, ev: Evidence) -> str:
    """The stored explanation: the explainer's phrase, then up to SUFFIX_TOKENS of the most frequent marked tokens
    of its evidence (`ev.explain`, never the held-out contexts the scorers use) that the phrase does not already
    quote, e.g. `closing brackets; fires on tokens such as ")", "]"`; tokens are dropped from the end to stay
    within MAX_EXPLANATION_CHARS.

    Why: a small explainer's phrase is often vague ("punctuation and special characters", "URL detection") and
    the tokens make it checkable, by a reader and by the scorers. Measured with Qwen2.5-Coder-1.5B on the default
    run (README, local explainers), they raise detection; prompt version interp-2 marks explanations with them."""
    names = [json.dumps(t, ensure_ascii=False) for t, _ in frequent_marked_tokens(ev.explain, COMPACT_COMMON)
             if not any(f"{o}{t}{c}" in phrase for o, c in ('""', "''", "“”", "``"))][:SUFFIX_TOKENS]
    while names:
        out = f"{phrase}; fires on tokens such as {', '.join(names)}"
        if len(out) <= MAX_EXPLANATION_CHARS:
            return out
        names.pop()
    return phrase


COMPACT_SYSTEM = (
    "You explain features of a language model: say what the marked tokens have in common. Answer with one short, "
    'specific phrase and nothing else, like: the word "import" in Python imports / opening brackets of Markdown '
    'links / closing parentheses in code / the suffix "-ly" of adverbs')


def compact_explain_messages(ev: Evidence, evidence_text: str | None = None) -> list[dict[str, str]]:
    text = evidence_text if evidence_text is not None else format_compact_evidence(ev)
    return [{"role": "system", "content": COMPACT_SYSTEM},
            {"role": "user", "content": f"A feature of a language model fires on the tokens marked {MARK_OPEN}like "
                                        f"this{MARK_CLOSE} in these excerpts (⏎ = newline):\n\n{text}\n\nWhat does "
                                        "the feature detect? Answer with one short phrase of at most 12 words."}]


def style_version(style: str) -> str:
    """The prompt version stored with an explanation written in `style`."""
    return COMPACT_VERSION if style == "compact" else PROMPT_VERSION


def style_evidence(ev: Evidence, style: str) -> str:
    return format_compact_evidence(ev) if style == "compact" else format_explain_evidence(ev)


def style_messages(ev: Evidence, style: str, evidence_text: str) -> list[dict[str, str]]:
    return compact_explain_messages(ev, evidence_text) if style == "compact" else explain_messages(ev, evidence_text)


def style_max_tokens(style: str) -> int:
    return COMPACT_MAX_TOKENS if style == "compact" else EXPLAIN_MAX_TOKENS


def evidence_sha256(evidence_text: str) -> str:
    return hashlib.sha256(evidence_text.encode("utf-8")).hexdigest()


def contexts_sha256(contexts: Sequence[Context], *extra: Any) -> str:
    """Identity of a scoring set: the contexts (tokens and acts) and anything else that shapes the prompts."""
    payload = json.dumps([[list(c.tokens), [round(a, 4) for a in c.acts], c.kind] for c in contexts] + list(extra),
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- templates
EXPLAIN_SYSTEM = (
    "You are a meticulous interpretability researcher studying one feature of a language model (a direction in "
    "its activations that fires on some tokens). You are shown text excerpts where the feature fires. Tokens "
    f"where it is active are marked {MARK_OPEN}like this{MARK_CLOSE}; after each excerpt, the marked tokens are "
    "listed with their activation on a 0-10 scale (10 = the feature's strongest activation). The first "
    "excerpts are the strongest; the rest are sampled across weaker activations. ⏎ stands for a newline.\n"
    "Find what the marked tokens have in common (the tokens themselves, their meaning, or the context that "
    "precedes them) and explain what the feature detects in a short phrase or one sentence of at most 15 words. "
    "Be specific; do not describe the markers, the scale or individual examples.\n"
    "End your answer with one final line of the form:\nExplanation: <your explanation>")


def explain_messages(ev: Evidence, evidence_text: str | None = None) -> list[dict[str, str]]:
    text = evidence_text if evidence_text is not None else format_explain_evidence(ev)
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": f"Excerpts where the feature fires:\n\n{text}\n\n"
                                        "What does the feature detect? End with 'Explanation: ...'."}]


DETECTION_SYSTEM = (
    "You check an explanation of a language-model feature. You get the explanation and numbered text excerpts. "
    "The feature fires on some excerpts and not on others. For each excerpt, decide whether it contains what the "
    "explanation describes, so that the feature would fire somewhere in it (1) or not (0). ⏎ stands for a "
    "newline. Answer with a JSON array of 0/1 values, one per excerpt in order, and nothing else; for three "
    "excerpts, e.g. [1, 0, 0].")

FUZZING_SYSTEM = (
    "You check an explanation of a language-model feature. In each numbered excerpt some tokens are marked "
    f"{MARK_OPEN}like this{MARK_CLOSE}. In some excerpts the marks are on the tokens where the feature fires; in "
    "others they were put on other, random tokens. For each excerpt, answer 1 if the marked tokens are what the "
    "explanation describes, 0 if they are not. ⏎ stands for a newline. Answer with a JSON array of 0/1 values, "
    "one per excerpt in order, and nothing else; for three excerpts, e.g. [0, 1, 1].")

# One excerpt per request, answered with a single digit, for log-probability scoring (scorers.py, method
# "logprob"): the answer's first token is the digit, so P("1") and P("0") are read at generated position 0.
DETECTION_ONE_SYSTEM = (
    "You check an explanation of a language-model feature. You get the explanation and one text excerpt. "
    "Decide whether the excerpt contains what the explanation describes, so that the feature would fire "
    "somewhere in it. ⏎ stands for a newline. Answer with the single digit 1 (yes) or 0 (no) and nothing else.")

FUZZING_ONE_SYSTEM = (
    f"You check an explanation of a language-model feature. In the excerpt some tokens are marked "
    f"{MARK_OPEN}like this{MARK_CLOSE}: either the tokens where the feature fires or other, random tokens. "
    "Decide whether the marked tokens are what the explanation describes. ⏎ stands for a newline. Answer with "
    "the single digit 1 (yes) or 0 (no) and nothing else.")

SIMULATION_SYSTEM = (
    "You predict how strongly a language-model feature fires on each token of a text, given an explanation of "
    "the feature. Activations are on a 0-10 scale: 0 = not active (most tokens), 10 = the strongest activation. "
    "Tokens are listed one per line as: number, tab, the token in quotes (⏎ = newline). Answer with a JSON array "
    "of integers from 0 to 10, one per token in the order given, and nothing else.")

# Scaling Monosemanticity (Templeton et al. 2024), "specificity": activating text is rated against the
# feature's explanation on a 0-3 rubric (the paper's wording, lightly adapted to an explanation).
SPECIFICITY_RUBRIC = (
    "0 - The explanation is completely irrelevant throughout the text.\n"
    "1 - The explanation is related to the text, but not to the marked token or its immediate context, or only "
    "vaguely related.\n"
    "2 - The explanation is only loosely related to the marked token, or it applies to the text near the marked "
    "token rather than the token itself.\n"
    "3 - The explanation cleanly identifies the marked token (in its context).")

SPECIFICITY_SYSTEM = (
    "You rate how well an explanation of a language-model feature describes a text where the feature fires. The "
    f"token where it fires is marked {MARK_OPEN}like this{MARK_CLOSE} (⏎ = newline). Use this rubric:\n"
    f"{SPECIFICITY_RUBRIC}\nAnswer with the single number 0, 1, 2 or 3 and nothing else.")


def numbered(lines: Sequence[str]) -> str:
    return "\n".join(f"{i}. {s}" for i, s in enumerate(lines, 1))


def detection_messages(explanation: str, excerpts: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "system", "content": DETECTION_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nExcerpts:\n{numbered(excerpts)}\n\n"
                                        f"Answer with a JSON array of {len(excerpts)} values (0 or 1)."}]


def fuzzing_messages(explanation: str, excerpts: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "system", "content": FUZZING_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nExcerpts:\n{numbered(excerpts)}\n\n"
                                        f"Answer with a JSON array of {len(excerpts)} values (0 or 1)."}]


def _one_excerpt_messages(system: str, explanation: str, excerpt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Explanation: {explanation}\n\nExcerpt:\n{excerpt}\n\nAnswer (1 or 0):"}]


def detection_one_messages(explanation: str, excerpt: str) -> list[dict[str, str]]:
    return _one_excerpt_messages(DETECTION_ONE_SYSTEM, explanation, excerpt)


def fuzzing_one_messages(explanation: str, excerpt: str) -> list[dict[str, str]]:
    return _one_excerpt_messages(FUZZING_ONE_SYSTEM, explanation, excerpt)


def simulation_messages(explanation: str, tokens: Sequence[str]) -> list[dict[str, str]]:
    listing = "\n".join(f"{i}\t{json.dumps(visible(t), ensure_ascii=False)}" for i, t in enumerate(tokens, 1))
    return [{"role": "system", "content": SIMULATION_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nTokens:\n{listing}\n\n"
                                        f"Answer with a JSON array of {len(tokens)} integers from 0 to 10."}]


def specificity_messages(explanation: str, excerpt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SPECIFICITY_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nText:\n{excerpt}\n\nRating (0-3):"}]


def list_max_tokens(n: int) -> int:
    """Room for a JSON array of n small numbers plus a little slack."""
    return 32 + 4 * n


# ---------------------------------------------------------------------------------------------- answers
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_ARRAY = re.compile(r"\[[^\[\]]*\]")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def strip_reasoning(text: str) -> str:
    return _THINK.sub("", text).strip()


def parse_explanation(text: str | None) -> str | None:
    """The explanation in a model's answer: the last `Explanation:` line, else the last non-empty line;
    quotes, markdown emphasis and a trailing period removed. None when nothing usable is left."""
    if not text:
        return None
    body = strip_reasoning(text)
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    if not lines:
        return None
    pick = None
    for i, ln in enumerate(lines):
        m = re.match(r"^[#*_\s>-]*explanation[*_\s]*[:：][*_\s]*(.*)$", ln, re.I)
        if m:
            pick = m.group(1).strip() or (lines[i + 1] if i + 1 < len(lines) else "")
    if pick is None:
        pick = _one_phrase(lines[-1])
    s = pick.strip().strip("*_`").strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'“”":
        s = s[1:-1].strip()
    s = s.strip("\"“”").strip()
    if len(s) > MAX_EXPLANATION_CHARS:
        cut = s[:MAX_EXPLANATION_CHARS]
        s = cut[: cut.rfind(". ") + 1] if ". " in cut else cut.rsplit(" ", 1)[0]
    s = s.rstrip(" .")
    if not re.search(r"\w", s):
        return None
    return s


_MID_EXPLANATION = re.compile(r"[*_\s]*\bexplanation[*_\s]*[:：][*_\s]*", re.I)
_BOILERPLATE = re.compile(r"^(?:the|this) feature (?:detects|identifies|looks for|fires on)\s+"
                          r"(?=[^\s\"'“`]\S*\s+\S)", re.I)  # kept when a quoted token or one word would be left


def _one_phrase(line: str) -> str:
    """A one-line answer as its phrase. Small local models often answer "The feature detects X. Explanation: The
    feature is detecting X, which ..." on one line: the shortest part of at least 3 words is the phrase (a 1-2
    word lead-in such as "Sure." is not), and a leading "The feature detects" is dropped: with
    Qwen2.5-Coder-1.5B the phrase kept is about half as long and scores the same detection."""
    parts = [p.strip() for p in _MID_EXPLANATION.split(line) if p.strip()]
    long = [p for p in parts if len(p.split()) >= 3]
    pick = min(long, key=len) if long else max(parts, key=len) if parts else line
    return _BOILERPLATE.sub("", pick)


def parse_number_list(text: str | None, n: int, lo: float, hi: float) -> list[float] | None:
    """n numbers in [lo, hi] from an answer: the last JSON array of length n (booleans and "yes"/"no" count
    as 1/0), else exactly n bare numbers in the text; values outside [lo, hi] are clamped. None otherwise."""
    if not text:
        return None
    body = strip_reasoning(text)
    for m in reversed(_ARRAY.findall(body)):
        vals = _array_values(m)
        if vals is not None and len(vals) == n:
            return [min(max(v, lo), hi) for v in vals]
    nums = [float(x) for x in _NUMBER.findall(body)]
    if len(nums) == n:
        return [min(max(v, lo), hi) for v in nums]
    return None


def _array_values(s: str) -> list[float] | None:
    try:
        raw = json.loads(s)
    except ValueError:
        try:
            raw = json.loads(re.sub(r",\s*\]", "]", s.replace("'", '"')))
        except ValueError:
            return None
    out: list[float] = []
    for v in raw:
        if isinstance(v, bool | int | float):
            out.append(float(v))
        elif isinstance(v, str) and v.strip().lower() in ("yes", "no", "true", "false", "1", "0"):
            out.append(1.0 if v.strip().lower() in ("yes", "true", "1") else 0.0)
        else:
            return None
    return out


# ---------------------------------------------------------------------------------------------- intruder, intervention
INTRUDER_SYSTEM = (
    "You are shown numbered text excerpts. All of them but one come from the same set: they share a pattern "
    "(a topic, a kind of token, a phrase or a context). Exactly one excerpt, the intruder, was taken from elsewhere "
    "and does not fit. ⏎ stands for a newline. Answer with the number of the intruder and nothing else.")

INTERVENTION_SYSTEM = (
    "You check an explanation of a language-model feature. The feature was turned up while the model continued a "
    "prompt, so the text it wrote should drift towards what the feature represents. You get the explanation, the "
    "prompt and two continuations, A and B: one written with the feature turned up, the other without. Decide "
    "which continuation was written with the feature turned up, judging by the explanation. Answer with the single "
    "letter A or B and nothing else.")

INTRUDER_MAX_TOKENS = 16
INTERVENTION_MAX_TOKENS = 8


def intruder_messages(excerpts: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "system", "content": INTRUDER_SYSTEM},
            {"role": "user", "content": f"Excerpts:\n{numbered(excerpts)}\n\n"
                                        f"Which excerpt (1-{len(excerpts)}) is the intruder? Answer with its number."}]


def intervention_messages(explanation: str, prompt: str, a: str, b: str) -> list[dict[str, str]]:
    def line(s: str) -> str:
        return visible(s) if s.strip() else "(nothing)"

    return [{"role": "system", "content": INTERVENTION_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nPrompt: {line(prompt)}\n\n"
                                        f"A: {line(a)}\nB: {line(b)}\n\nWhich continuation, A or B, was written "
                                        "with the feature turned up?"}]


_KEYED_CHOICE = re.compile(r"^[#*_\s>-]*(?:the\s+)?(?:intruder|answer|response|choice|continuation|excerpt)"
                           r"(?:\s+is)?[*_\s]*[:：=]?[*_\s]*(?:excerpt|example|continuation|number|no\.?|#)?\s*"
                           r"([A-Za-z0-9]+)[*_`\s.)]*$", re.I)


def _choice(text: str | None) -> str | None:
    """The one token an answer commits to: the whole answer (markdown, brackets and a final period stripped), or
    the last line's `Answer: X` / `The intruder is excerpt 3` / `[RESPONSE]: 3`. None for anything longer, so an
    answer that merely mentions several candidates is never read as a choice."""
    if not text:
        return None
    body = strip_reasoning(text)
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    if not lines:
        return None
    whole = body.strip().strip("`*_[]()\"'. \n\t")
    if re.fullmatch(r"[A-Za-z0-9]+", whole):
        return whole
    last = lines[-1].replace("[RESPONSE]", "answer")
    m = _KEYED_CHOICE.match(last)
    return m.group(1) if m else None


def parse_intruder(text: str | None, n: int) -> int | None:
    """The intruder's number (1..n) from an answer; None when unreadable or out of range."""
    c = _choice(text)
    if c is None or not c.isdigit():
        return None
    v = int(c)
    return v if 1 <= v <= n else None


def parse_ab(text: str | None) -> str | None:
    """"A" or "B" from an answer; None when unreadable."""
    c = _choice(text)
    return c.upper() if c is not None and c.upper() in ("A", "B") else None
