"""The routing table: validated rules, indexed for the hot path, plus experts by identity key.

``decide`` evaluates only the rules that can match an event's channel, source and dialled number
(``to``): each rule's top-level ``and`` conjuncts are searched for guards such as
``channel == "phone"`` or ``to in ["+4930...", ...]``, and the candidate list for every
combination of values seen is computed once and cached. Candidates keep their file order, so the
first matching candidate is the first matching rule, exactly as a linear scan would find it.

Rules that cannot hold unless a field contains a literal (``text ~ "(?i)kündig"``, see
:mod:`rules.prefilter`) or matches a regular expression without one (``text ~ "^\\d{5}$"``)
are pooled per candidate list: one search per field for any of their literals, one for any of
their patterns (joined into one alternation). A contact for which none hits, the usual case,
is decided by the list without those rules; otherwise every rule is tried in order as before,
the pooled ones only where their own search hit. So unguarded keyword and pattern rules cost
a search per field and contact, not one per rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

import msgspec

from channels.contact_event import ContactEvent
from rules.decision import CustomerView, Decision
from rules.expr import (
    Condition,
    LocalClock,
    Seen,
    explain_tree,
    field_getter,
    guards,
    regex_conjuncts,
    residual_predicate,
)
from rules.identity import sender_keys
from rules.prefilter import any_literal, any_of, fold, required_literals, scoped
from rules.schema import Expert, RoutingFile, Rule


def make_local_time(tz: tzinfo) -> LocalClock:
    """The clock conditions use for ``hour``, ``minute`` and ``weekday`` in ``tz``."""
    return LocalClock(tz)


class RuleTrace(msgspec.Struct, frozen=True, kw_only=True):
    """How one rule fared: matched or not, and the sub-conditions that decided it."""

    rule: str
    matched: bool
    condition: str | None = None
    why: tuple[Seen, ...] = ()


class Explanation(msgspec.Struct, frozen=True, kw_only=True):
    """The decision for one contact, the clock and customer it saw, and every rule tried."""

    decision: Decision
    at: str
    hour: int
    minute: int
    weekday: str
    customer: CustomerView
    trace: tuple[RuleTrace, ...]


Predicate = Callable[[ContactEvent, CustomerView, float], Any]


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule with its compiled condition (None: always holds) and its precomputed decision."""

    rule: Rule
    condition: Condition | None
    decision: Decision
    guards: dict[str, frozenset[str]]
    residual: Predicate | None  # the condition without its guards (the index checked them)
    #: (field, literals, case-insensitive): the field must contain one of the literals for a
    #: match (None: no such literal is known).
    needle: tuple[str, tuple[str, ...], bool] | None = None
    #: (field, pattern as a :func:`~rules.prefilter.scoped` alternative): for a rule without a
    #: needle, a regular expression its field must match (None: none that can be combined).
    gate: tuple[str, str] | None = None


def _decision(rule: Rule) -> Decision:
    return Decision(
        rule=rule.name,
        queue=rule.queue,
        priority=rule.priority,
        skills=dict(rule.skills),
        tags=rule.tags,
        attributes=dict(rule.attributes),
        escalate=rule.escalate,
        crowd_first=rule.crowd_first,
        reject=rule.reject,
    )


#: (field, getter, folded, its one literal or None, the pooled search or None).
_Check = tuple[str, Predicate, bool, str | None, Callable[[str], Any] | None]


class _Candidates:
    """The rules an event with one (channel, source, to, tags) key can match, in file order.

    Rules that need a literal (a needle) or a regular expression (a gate) in a field are pooled:
    ``checks`` holds one search per field for any of them. When none hits (most contacts)
    ``plain``, the candidates without those rules, decides; otherwise ``full`` does, where each
    pooled rule names its check (``-1``: not pooled) and its own literals.
    """

    __slots__ = ("checks", "full", "plain")

    def __init__(
        self,
        checks: tuple[_Check, ...],
        plain: tuple[tuple[Predicate | None, Decision], ...],
        full: tuple[tuple[int, tuple[str, ...] | None, Predicate | None, Decision], ...],
    ) -> None:
        self.checks = checks
        self.plain = plain
        self.full = full


_Key = tuple[str | None, str | None, str | None, frozenset[str]]
_NO_TAGS: frozenset[str] = frozenset()


class RoutingTable:
    """A validated routing file, ready to route: build it with :func:`rules.load.load_routing`.

    ``decide`` is pure and cheap (a dict look-up plus the candidate rules' closures); the
    decisions it returns are shared, precomputed objects and must not be mutated.
    """

    file: RoutingFile
    experts: tuple[Expert, ...]

    def __init__(
        self,
        file: RoutingFile,
        experts: Sequence[Expert],
        conditions: Sequence[Condition | None],
        tz: tzinfo,
    ) -> None:
        if len(conditions) != len(file.rules):
            raise ValueError("one condition per rule")
        self.file = file
        self.experts = tuple(experts)
        self.tz = tz
        self.local_time = make_local_time(tz)
        self.rules: tuple[CompiledRule, ...] = tuple(
            CompiledRule(
                rule=rule,
                condition=cond,
                decision=_decision(rule),
                guards=guards(cond.tree) if cond is not None else {},
                residual=residual_predicate(cond.tree, self.local_time) if cond else None,
                needle=_needle(cond),
                gate=_gate(cond),
            )
            for rule, cond in zip(file.rules, conditions, strict=True)
        )
        values: dict[str, set[str]] = {
            "channel": set(),
            "source": set(),
            "to": set(),
            "tags": set(),
        }
        for compiled in self.rules:
            for name, allowed in compiled.guards.items():
                values[name] |= allowed
        self._channels = frozenset(values["channel"])
        self._sources = frozenset(values["source"])
        self._tos = frozenset(values["to"])
        self._tags = frozenset(values["tags"])
        self._cache: dict[_Key, _Candidates] = {}
        self._by_key: dict[str, Expert] = {}
        for expert in self.experts:
            for key in expert_keys(expert):
                self._by_key.setdefault(key, expert)

    # --- experts ---------------------------------------------------------------------------

    def expert_for(self, keys: Iterable[str]) -> Expert | None:
        """The first expert any of ``keys`` (``"phone:+49..."``, ``"email:..."``...) belongs to."""
        for key in keys:
            expert = self._by_key.get(key)
            if expert is not None:
                return expert
        return None

    def identity_keys(self, event: ContactEvent) -> tuple[str, ...]:
        """The sender's identity keys, normalised like the experts' keys."""
        return sender_keys(event.sender)

    def customer_view(self, event: ContactEvent) -> CustomerView:
        """What the routing file alone knows of the sender: whether it is a crowd expert.

        The engine builds a fuller view from its customer history; this one is for ``explain``
        and for callers without history. An expert's customer id is the expert's id.
        """
        expert = self.expert_for(self.identity_keys(event))
        if expert is None:
            return CustomerView()
        return CustomerView(id=expert.id, known=True, expert=True, expert_level=expert.level)

    # --- deciding --------------------------------------------------------------------------

    def _candidates(self, key: _Key) -> _Candidates:
        channel, source, to, tags = key
        seen = {"channel": channel, "source": source, "to": to}
        pooled: dict[tuple[str, bool, bool], list[str]] = {}  # (field, folded, regex) -> needs
        order: list[tuple[CompiledRule, tuple[str, bool, bool] | None]] = []
        for compiled in self.rules:
            if not all(
                allowed <= tags if name == "tags" else seen[name] in allowed
                for name, allowed in compiled.guards.items()
            ):
                continue
            where: tuple[str, bool, bool] | None = None
            if compiled.residual is not None and compiled.needle is not None:
                name, literals, icase = compiled.needle
                where = (name, icase, False)
                pooled.setdefault(where, []).extend(literals)
            elif compiled.residual is not None and compiled.gate is not None:
                name, piece = compiled.gate
                where = (name, False, True)
                pooled.setdefault(where, []).append(piece)
            order.append((compiled, where))
            if compiled.residual is None:
                break  # this rule holds for every such event: the ones after it never decide
        group: dict[tuple[str, bool, bool], int] = {}
        checks: list[_Check] = []
        for (name, icase, is_regex), needs in pooled.items():
            group[(name, icase, is_regex)] = len(checks)
            get = field_getter(name, self.local_time)
            if is_regex:
                checks.append((name, get, False, None, any_of(needs).search))
            elif len(set(needs)) == 1:
                checks.append((name, get, icase, needs[0], None))
            else:
                checks.append((name, get, icase, None, any_literal(needs).search))
        candidates = _Candidates(
            tuple(checks),
            tuple((c.residual, c.decision) for c, where in order if where is None),
            tuple(
                (
                    -1 if where is None else group[where],
                    c.needle[1] if where is not None and c.needle is not None else None,
                    c.residual,
                    c.decision,
                )
                for c, where in order
            ),
        )
        self._cache[key] = candidates
        return candidates

    def decide(self, event: ContactEvent, customer: CustomerView, now: float) -> Decision:
        """The decision of the first rule whose condition holds (the default rule at the end)."""
        channel: str | None = event.channel
        if channel not in self._channels:
            channel = None
        source: str | None = event.source
        if source not in self._sources:
            source = None
        to: str | None = event.to or ""
        if to not in self._tos:
            to = None
        # Only the tags some rule asks for are part of the key, so the cache stays small.
        tags = self._tags.intersection(event.tags) if event.tags else _NO_TAGS
        key = (channel, source, to, tags)
        candidates = self._cache.get(key)
        if candidates is None:
            candidates = self._candidates(key)
        if candidates.checks:
            # One search per field for everything the pooled rules need; a field folded once.
            hays: list[str] = []
            passing: list[bool] = []
            folded: dict[str, str] = {}
            for name, get, icase, literal, search in candidates.checks:
                if icase:
                    hay = folded.get(name)
                    if hay is None:
                        hay = folded[name] = fold(get(event, customer, now) or "")
                else:
                    hay = get(event, customer, now) or ""
                hays.append(hay)
                passing.append(literal in hay if search is None else search(hay) is not None)
            if True in passing:
                for g, literals, predicate, decision in candidates.full:
                    if g >= 0:
                        if not passing[g]:
                            continue
                        if literals is not None and not any(lit in hays[g] for lit in literals):
                            continue  # another rule's literal was there, not this one's
                    if predicate is None or predicate(event, customer, now):
                        return decision
                raise LookupError("no rule matched and there is no default rule")
        for predicate, decision in candidates.plain:
            if predicate is None or predicate(event, customer, now):
                return decision
        raise LookupError("no rule matched and there is no default rule")

    def decide_linear(self, event: ContactEvent, customer: CustomerView, now: float) -> Decision:
        """``decide`` without the index: every rule in order (what the index must agree with)."""
        for compiled in self.rules:
            cond = compiled.condition
            if cond is None or cond.predicate(event, customer, now):
                return compiled.decision
        raise LookupError("no rule matched and there is no default rule")

    def explain(self, event: ContactEvent, customer: CustomerView, now: float) -> Explanation:
        """The decision plus, for every rule up to the one that matched, why it did or did not.

        Rules are evaluated in file order without the index, so rules the index would have
        skipped are shown failing on their channel/source/to condition.
        """
        trace: list[RuleTrace] = []
        decision: Decision | None = None
        for compiled in self.rules:
            cond = compiled.condition
            why: list[Seen] = []
            if cond is None:
                matched = True
            else:
                matched, why = explain_tree(cond, self.local_time, event, customer, now)
            trace.append(
                RuleTrace(
                    rule=compiled.rule.name,
                    matched=matched,
                    condition=cond.text if cond is not None else None,
                    why=tuple(why),
                )
            )
            if matched:
                decision = compiled.decision
                break
        if decision is None:
            raise LookupError("no rule matched and there is no default rule")
        hour, minute, weekday = self.local_time(now)
        return Explanation(
            decision=decision,
            at=datetime.fromtimestamp(now, self.tz).isoformat(),
            hour=hour,
            minute=minute,
            weekday=weekday,
            customer=customer,
            trace=tuple(trace),
        )


def _needle(cond: Condition | None) -> tuple[str, tuple[str, ...], bool] | None:
    """The literals one of the condition's top-level regular expressions needs (the most
    selective: fewest alternatives, then the shortest one longest)."""
    if cond is None:
        return None
    found = []
    for name, pattern in regex_conjuncts(cond.tree):
        literals = required_literals(pattern)
        if literals is not None:
            found.append((name, *literals))
    if not found:
        return None
    return min(found, key=lambda f: (len(f[1]), -min(len(lit) for lit in f[1])))


def _gate(cond: Condition | None) -> tuple[str, str] | None:
    """The first top-level regular expression of a condition that can be pooled with others
    (see :func:`rules.prefilter.scoped`), for rules :func:`_needle` found no literal for."""
    if cond is None or _needle(cond) is not None:
        return None
    for name, pattern in regex_conjuncts(cond.tree):
        piece = scoped(pattern)
        if piece is not None:
            return name, piece
    return None


def expert_keys(expert: Expert) -> tuple[str, ...]:
    """An expert's identity keys (already normalised by the loader)."""
    return (
        *(f"phone:{p}" for p in expert.phones),
        *(f"email:{e}" for e in expert.emails),
        *(f"handle:{h}" for h in expert.handles),
    )
