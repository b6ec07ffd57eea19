"""What the engine keeps of a contact's event, and a reload that routes contacts again.

The engine keeps the routing facts of a contact, not its body (the daemon keeps the event
beside it); rules that read ``text`` see the whole body when the contact arrives, and a reload
that removes a contact's queue routes it again on the whole event it is given.
"""

from __future__ import annotations

from router.messages import Login
from tests.router.enginekit import call, engine, offers, table

BEFORE = """
queues:
  general: {}
  billing: {}
  tv: {}
agents:
  - {id: a1, capacity: {email: 5}}
rules:
  - {name: bill, when: 'text ~ "(?i)rechnung"', queue: billing}
  - {name: box, when: 'text ~ "(?i)receiver"', queue: tv}
  - {name: default, default: true, queue: general}
"""
# The billing queue is gone; the same rules send the contact by its body.
AFTER = BEFORE.replace("  billing: {}\n", "").replace("queue: billing", "queue: tv")
AFTER = AFTER.replace('"(?i)rechnung"', '"(?i)doppelt"')


def test_rules_read_the_body_at_arrival_and_the_engine_keeps_none_of_it() -> None:
    eng = engine(BEFORE)
    body = "Die Rechnung für Dezember wurde doppelt abgebucht. " * 40
    eng.handle(call("m1", channel="email", email="k@example.de", text=body), 1.0)
    assert eng.state.contacts["generic:m1"].queue == "billing"
    assert b"doppelt" not in eng.snapshot()
    # The offer the engine makes carries the contact's identity; the daemon puts the event in.
    (offer,) = offers(eng.handle(Login(agent_id="a1"), 2.0))
    assert (offer.contact.contact_id, offer.contact.channel) == ("generic:m1", "email")
    assert offer.contact.text is None


def test_a_reload_routes_a_contact_whose_queue_went_on_the_event_it_is_given() -> None:
    mail = call("m1", channel="email", email="k@example.de", text="Rechnung doppelt bezahlt")
    with_event, without = engine(BEFORE), engine(BEFORE)
    for eng in (with_event, without):
        eng.handle(mail, 1.0)
        assert eng.rerouted_by(table(AFTER)) == ["generic:m1"]
    with_event.reload(table(AFTER), 2.0, {"generic:m1": mail})
    without.reload(table(AFTER), 2.0)
    # The whole event matches the new keyword rule; the engine's own record has no body.
    assert with_event.state.contacts["generic:m1"].queue == "tv"
    assert without.state.contacts["generic:m1"].queue == "general"
