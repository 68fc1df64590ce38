"""The ranker's prompt (paper section 4): instruction, similar users' interactions, the user's input.

Layout (template 2; the shared per-user part first: the ranker encodes it once per request and
scores every candidate as a short suffix over its KV cache, ``ranker_svc.prefix``)::

    Instruction: Predict whether the user will click on the given item, ... Answer Yes or No.
    Examples:
    User A liked "Title 1"; disliked "Title 2".          <- similar users, most similar first
    User B rated "Title 3" with 4 stars.                  (rating_style="stars")
    Input:
    The user liked "Title 4"; disliked "Title 5".        <- the user's own history, oldest first
    Question: Will the user click on the target item?
    ---------------------------------------------------- context_text ends / target_text begins
    Target item: "Candidate title"
    Answer:                                              <- the next token is " Yes" or " No"

The question is the same for every candidate, so it belongs to the shared context: the per-candidate
suffix is ~8 tokens plus the title. Template 1 (artifacts written before templates were recorded)
asked the question after the target; ``PromptConfig.from_json`` keeps it for those artifacts.
The context ends in a non-space character and the suffix starts with a newline, so a byte-level BPE
tokenises ``context + suffix`` exactly as the two parts (checked per tokenizer at load time,
``ranker_svc.artifact.check_context_split``).

Collaborative soft tokens (``collab``, ``ranker_svc.collab``): ``user`` adds the line
``User profile: <|cf|>`` after the instruction; ``full`` also follows every history title with
`` <|cf|>`` and ends the prompt with one for the target (``Answer: <|cf|>``: the answer is read at
the target's slot, see ``ranker_svc.collab``). :meth:`PromptBuilder.context_vectors` and
:meth:`PromptBuilder.target_vectors` list the vectors of those slots in the order they appear.

Titles are untrusted catalog text. :func:`sanitize_title` makes each one a single bounded line
that cannot impersonate the answer: control and format characters become spaces, double quotes
become single quotes (titles are quoted), whitespace collapses, long titles are cut to
``max_title_chars`` (ending "..."), and after cutting, every word that starts with an answer word
("Yes"/"No", or ``answer_yes``/``answer_no``) in any case is lower-cased. Whole words, not only
standalone ones: a BPE tokenizer splits " Nothing" or " Nope" into " No" + rest, so leaving them
would put the answer token itself into the title. After this no title holds the substring " Yes"
or " No"; a byte-level BPE or SentencePiece token is a substring of the text, so a title can
neither contain an answer token nor fake an answered prompt (``tests/ranker_svc/test_prompt.py``
and ``test_prompt_injection.py`` check this token by token on generated titles).

Tokenisation (the one place prompts become token ids, for training, evaluation and serving alike):
:func:`encode_prompt` (one full prompt, over-long ones cut in the middle), :func:`encode_examples`
(examples' full prompts, soft-token slots bound) and :func:`encode_shared` (one context and its
candidates as suffixes that continue it token for token).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from exitrank.limits import MAX_NEIGHBORS
from exitrank.types import HistoryItem, RankExample, UserContext
from ranker_svc.collab import COLLAB_TOKEN, MODES, SoftTable


def answer_pattern(answers: tuple[str, ...]) -> re.Pattern:
    """Words starting with any of ``answers`` (stripped), in any case."""
    return re.compile(r"\b(?:" + "|".join(re.escape(a.strip()) for a in answers) + r")\w*", re.IGNORECASE)


_ANSWER_WORDS = answer_pattern(("Yes", "No"))
TEMPLATES = (1, 2)
QUESTION = "Will the user click on the target item?"


@dataclass(frozen=True, slots=True)
class PromptConfig:
    """How prompts are rendered; stored in ``exitrank.json`` so serving matches training.

    Args:
        instruction: the task directive (paper section 4, step 1).
        rating_style: ``"binary"`` (liked/disliked) or ``"stars"`` ("rated X with 4 stars").
        like_threshold: ratings >= this read as "liked" in binary style (1 suits implicit data).
        max_title_chars: titles are cut to this many characters (>= 8).
        max_history: most recent own interactions shown (>= 1).
        neighbor_history: most recent interactions shown per similar user (>= 1).
        num_neighbors: similar users requested when a request says 0 (the paper uses 4).
        answer_yes / answer_no: the answer strings that follow the prompt (one token each).
        template: 2 (the question in the shared context) or 1 (the question after the target).
        collab: collaborative soft tokens: ``none`` (the paper's text-only prompt), ``user``, ``full``.
    """

    instruction: str = (
        "Predict whether the user will click on the given item, based on the items the user "
        "interacted with and the interactions of similar users. Answer Yes or No."
    )
    rating_style: str = "binary"
    like_threshold: float = 4.0
    max_title_chars: int = 64
    max_history: int = 10
    neighbor_history: int = 5
    num_neighbors: int = 4
    answer_yes: str = " Yes"
    answer_no: str = " No"
    template: int = 2
    collab: str = "none"

    def __post_init__(self) -> None:
        if self.collab not in MODES:
            raise ValueError(f"prompt.collab must be one of {', '.join(MODES)}, got {self.collab!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"prompt.template must be one of {TEMPLATES}, got {self.template!r}")
        if self.rating_style not in ("binary", "stars"):
            raise ValueError(f"prompt.rating_style must be 'binary' or 'stars', got {self.rating_style!r}")
        if self.max_title_chars < 8:
            raise ValueError(f"prompt.max_title_chars must be >= 8, got {self.max_title_chars}")
        for name in ("max_history", "neighbor_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"prompt.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.num_neighbors <= MAX_NEIGHBORS:
            raise ValueError(f"prompt.num_neighbors must be in 0..{MAX_NEIGHBORS}, got {self.num_neighbors}")
        if self.answer_yes == self.answer_no or not self.answer_yes.strip() or not self.answer_no.strip():
            raise ValueError("prompt.answer_yes and prompt.answer_no must be distinct, non-blank strings")
        if self.answer_yes.islower() or self.answer_no.islower():
            # titles are neutralised by lower-casing words that start with an answer (sanitize_title)
            raise ValueError("prompt.answer_yes and prompt.answer_no must contain an upper-case letter")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict) -> "PromptConfig":
        """From ``exitrank.json``; a row without ``template`` predates templates: template 1."""
        names = cls.__dataclass_fields__
        return cls(**{"template": 1, **{k: v for k, v in row.items() if k in names}})


def sanitize_title(title: str, max_chars: int, answers: re.Pattern = _ANSWER_WORDS) -> str:
    """One bounded line of title text that cannot contain the answer words (see module docstring);
    ``answers``: :func:`answer_pattern` of the configured answers (default Yes/No)."""
    text = unicodedata.normalize("NFKC", title)
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    text = " ".join(text.replace('"', "'").replace(COLLAB_TOKEN, " ").split())
    if len(text) > max_chars:
        text = text[: max_chars - 3].rstrip() + "..."
    text = answers.sub(lambda m: m.group(0).lower(), text)
    return text or "(untitled)"


class PromptBuilder:
    """Renders :class:`UserContext` and a candidate title into the prompt text.

    Args:
        config: rendering settings (default :class:`PromptConfig`).
    """

    def __init__(self, *, config: PromptConfig | None = None) -> None:
        self.config = config or PromptConfig()
        self._answers = answer_pattern((self.config.answer_yes, self.config.answer_no))

    def context_text(self, ctx: UserContext) -> str:
        """Instruction, similar users' interactions, then the user's own history (the shared part)."""
        cfg = self.config
        lines = [f"Instruction: {cfg.instruction}"]
        if cfg.collab != "none":
            lines.append(f"User profile: {COLLAB_TOKEN}")
        lines.append("Examples:")
        neighbors = ctx.neighbors[:MAX_NEIGHBORS]
        if not neighbors:
            lines.append("none")
        for i, neighbor in enumerate(neighbors):
            lines.append(f"User {_user_label(i)} {self._interactions(neighbor.history, cfg.neighbor_history)}.")
        lines.append("Input:")
        if shown(ctx.history, cfg.max_history):
            lines.append(f"The user {self._interactions(ctx.history, cfg.max_history)}.")
        else:
            lines.append("The user has no history.")
        if cfg.template == 2:
            lines.append(f"Question: {QUESTION}")
        return "\n".join(lines)

    def target_text(self, title: str) -> str:
        """The candidate, last; the prompt ends so that the next token is the answer."""
        shown = sanitize_title(title, self.config.max_title_chars, self._answers)
        slot = f" {COLLAB_TOKEN}" if self.config.collab == "full" else ""  # the target's, read by the answer
        if self.config.template == 1:
            return f'\nTarget item: "{shown}"\n{QUESTION} Answer:{slot}'
        return f'\nTarget item: "{shown}"\nAnswer:{slot}'

    def full_text(self, ctx: UserContext, title: str) -> str:
        return self.context_text(ctx) + self.target_text(title)

    def context_vectors(self, ctx: UserContext) -> list:
        """The vectors of the context's soft-token slots, in prompt order (empty for ``none``)."""
        cfg = self.config
        if cfg.collab == "none":
            return []
        vectors = [ctx.user_embedding]
        if cfg.collab == "full":
            for neighbor in ctx.neighbors[:MAX_NEIGHBORS]:
                vectors += [h.embedding for h in shown(neighbor.history, cfg.neighbor_history)]
            vectors += [h.embedding for h in shown(ctx.history, cfg.max_history)]
        return vectors

    def target_vectors(self, embedding) -> list:
        """The vectors of the target suffix's slots: ``[embedding]`` in ``full`` mode, else none."""
        return [embedding] if self.config.collab == "full" else []

    def answer_text(self, label: int) -> str:
        """The string that follows the prompt for a 0/1 label (" Yes" for 1)."""
        return self.config.answer_yes if label else self.config.answer_no

    def _interactions(self, history: tuple[HistoryItem, ...], limit: int) -> str:
        recent = shown(history, limit)
        if not recent:
            return "has no interactions"
        return "; ".join(self._interaction(item) for item in recent)

    def _interaction(self, item: HistoryItem) -> str:
        title = sanitize_title(item.title, self.config.max_title_chars, self._answers)
        slot = f" {COLLAB_TOKEN}" if self.config.collab == "full" else ""
        if self.config.rating_style == "stars":
            return f'rated "{title}"{slot} with {item.rating:g} stars'
        verb = "liked" if item.rating >= self.config.like_threshold else "disliked"
        return f'{verb} "{title}"{slot}'


def shown(history: tuple[HistoryItem, ...], limit: int) -> tuple[HistoryItem, ...]:
    """The interactions a prompt shows: the newest ``limit`` of those whose item has a catalog title.
    An item without one (an id the catalog never described) is left out, never written as its id:
    ids come from whoever calls Ingest, titles only from the catalog (UpsertItems)."""
    return tuple(item for item in history if item.title)[-limit:]


def _user_label(index: int) -> str:
    """A, B, ..., Z, then A2, B2, ... (user ids never reach the prompt)."""
    letter = string.ascii_uppercase[index % 26]
    return letter if index < 26 else f"{letter}{index // 26 + 1}"


def encode_prompt(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Token ids of a prompt; over-long ones keep their first token (BOS) and their end (target + cue)."""
    ids = tokenizer(text)["input_ids"]
    if len(ids) > max_tokens:
        ids = ids[:1] + ids[len(ids) - max_tokens + 1 :]
    return ids


def encode_examples(examples: Sequence[RankExample], prompt: PromptBuilder, tokenizer, max_tokens: int,
                    table: SoftTable | None = None) -> list[list[int]]:
    """Each example's full prompt as token ids; with ``table``, its soft-token slots bound to the
    context's vectors and the target's (``RankExample.item_embedding``)."""
    out = []
    for ex in examples:
        ids = encode_prompt(tokenizer, prompt.full_text(ex.context, ex.title), max_tokens)
        if table is not None:
            context, target = prompt.context_vectors(ex.context), prompt.target_vectors(ex.item_embedding)
            partners = [None] * len(context) + [ex.context.user_embedding] * len(target)
            ids = table.bind(ids, context + target, partners)
        out.append(ids)
    return out


def encode_shared(ctx: UserContext, titles: Sequence[str], prompt: PromptBuilder, tokenizer, max_tokens: int, *,
                  targets: Sequence | None = None, table: SoftTable | None = None) -> tuple[list[int], list[list[int]]]:
    """``(context ids, suffix ids per title)``: the shared context once (BOS first), each candidate as
    a suffix (no BOS); ``context + suffix`` is the full prompt's ids when the tokenizer splits cleanly
    at the boundary (``ranker_svc.artifact.check_context_split``).

    A context too long for ``max_tokens`` with the longest suffix keeps its first token (BOS) and
    its end (the user's own history and the question), like :func:`encode_prompt`. ``table``:
    soft-token slots are bound to the context's vectors and each candidate's (``targets``, one
    vector or None per title).
    """
    context = tokenizer(prompt.context_text(ctx))["input_ids"]
    suffixes = tokenizer([prompt.target_text(t) for t in titles], add_special_tokens=False)["input_ids"]
    budget = max_tokens - max(len(s) for s in suffixes)
    if len(context) > budget:
        context = context[:1] + context[len(context) - budget + 1 :]
    if table is not None:
        context = table.bind(context, prompt.context_vectors(ctx))
        user = [ctx.user_embedding]  # the target's slot also reads user * item
        targets = targets if targets is not None else (None,) * len(titles)
        suffixes = [table.bind(s, prompt.target_vectors(e), user) for s, e in zip(suffixes, targets)]
    return context, suffixes
