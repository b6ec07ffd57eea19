"""The routing table: validated rules, indexed for the hot path, plus experts by identity key.

``decide`` evaluates only the rules that can match an event's channel, source and dialled number
(``to``): each rule's top-level ``and`` conjuncts are searched for guards such as
``channel == "phone"`` or ``to in ["+4930...", ...]``, and the candidate list for every
combination of values seen is computed once and cached. Candidates keep their file order, so the
first matching candidate is the first matching rule, exactly as a linear scan would find it.
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
from rules.prefilter import fold, required_literals
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


#: (predicate, decision); a keyword run is (run, None) and its predicate returns the decision.
_Candidates = tuple[tuple[Predicate | None, Decision | None], ...]
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
        #: [event, customer, {field: folded text}] of the contact the keyword runs saw last.
        self._fold_memo: list[Any] = [None, None, {}]
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
        found: list[tuple[Predicate | None, Decision | None]] = []
        run: list[CompiledRule] = []
        for compiled in self.rules:
            if all(
                allowed <= tags if name == "tags" else seen[name] in allowed
                for name, allowed in compiled.guards.items()
            ):
                if compiled.needle is not None:
                    run.append(compiled)
                    continue
                if run:
                    found.append((self._keyword_run(run), None))
                    run = []
                found.append((compiled.residual, compiled.decision))
        if run:
            found.append((self._keyword_run(run), None))
        candidates = tuple(found)
        self._cache[key] = candidates
        return candidates

    def _keyword_run(self, run: list[CompiledRule]) -> Predicate:
        """One predicate for consecutive rules with a required literal: the first of them that
        holds, tried only where its literal occurs. A field is folded once per contact, also
        across runs (the memo holds the last contact's folded fields)."""
        members = [
            (name, field_getter(name, self.local_time), literals, icase, c.residual, c.decision)
            for c in run
            if c.needle is not None and c.residual is not None
            for name, literals, icase in (c.needle,)
        ]
        memo = self._fold_memo

        def keyword_run(e: ContactEvent, c: CustomerView, n: float) -> Decision | None:
            if memo[0] is not e or memo[1] is not c:
                memo[:] = [e, c, {}]
            folded = memo[2]
            for name, get, literals, icase, predicate, decision in members:
                if icase:
                    hay = folded.get(name)
                    if hay is None:
                        hay = folded[name] = fold(get(e, c, n) or "")
                else:
                    hay = get(e, c, n) or ""
                for literal in literals:
                    if literal in hay:
                        if predicate(e, c, n):
                            return decision
                        break
            return None

        return keyword_run

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
        for predicate, decision in candidates:
            if predicate is None:
                assert decision is not None  # only keyword runs come without a decision
                return decision
            hit = predicate(event, customer, now)
            if hit:
                return decision if decision is not None else hit
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


def expert_keys(expert: Expert) -> tuple[str, ...]:
    """An expert's identity keys (already normalised by the loader)."""
    return (
        *(f"phone:{p}" for p in expert.phones),
        *(f"email:{e}" for e in expert.emails),
        *(f"handle:{h}" for h in expert.handles),
    )
