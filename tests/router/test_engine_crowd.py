"""The crowd side of the engine: experts recognised on every channel, their activity, the
community backstop, and one customer across channels."""

from __future__ import annotations

from channels.contact_event import ContactEvent, Sender
from router.engine import Engine
from router.messages import LinkKeys, RefusedCmd, RemoveExpert, UpsertExpert
from rules.schema import Expert
from tests.router.enginekit import (
    accept_and_complete,
    call,
    engine,
    events,
    login_all,
    offered_to,
    offers,
)

CROWD = """
skills: [l1, l2, community]
queues:
  first: {skills: {l1: 1}}
  expert_desk: {skills: {l2: 1}, weight: 10}
  community_desk: {skills: {community: 1}, channels: [social]}
agents:
  - {id: l1agent, skills: {l1: 1}, capacity: {phone: 1, chat: 3, email: 5}}
  - {id: l2agent, skills: {l2: 1}, capacity: {phone: 1, chat: 3, email: 5, social: 5}}
  - {id: mod, skills: {community: 1}, capacity: {social: 5}}
experts:
  - id: heinz
    name: Heinz Fischer
    level: 3
    phones: ["0171 2345678"]
    emails: [Heinz.Fischer@example.net]
    handles: ["discourse:heinzf"]
rules:
  - {name: expert, when: customer.expert, queue: expert_desk, priority: 100}
  - name: personal
    when: 'channel == "social" and text ~ "(?i)rechnung|iban"'
    queue: community_desk
  - {name: community, when: 'channel == "social"', queue: community_desk, crowd_first: 1800}
  - {name: default, default: true, queue: first}
"""


def post(
    topic: str, user: str, kind: str = "new", text: str = "Frage", **attributes: str
) -> object:
    return ContactEvent(
        kind=kind,  # type: ignore[arg-type]
        contact_id=f"discourse:{topic}",
        channel="social",
        source="discourse",
        external_id=topic,
        thread_id=topic,
        sender=Sender(handle=f"discourse:{user}"),
        text=text,
        attributes=attributes,
    )


def crowd() -> Engine:
    eng = engine(CROWD)
    login_all(eng, ["l1agent", "l2agent", "mod"])
    return eng


def test_an_expert_reaches_the_expert_desk_by_phone_email_and_handle() -> None:
    eng = crowd()
    by_phone = eng.handle(call("p", phone="+491712345678"), 0.0)
    by_mail = eng.handle(call("m", channel="email", email="heinz.fischer@EXAMPLE.net"), 1.0)
    by_handle = eng.handle(call("h", channel="chat", handle="discourse:HeinzF"), 2.0)
    for cmds in (by_phone, by_mail, by_handle):
        (queued,) = events(cmds, "contact.queued")
        assert queued.event.queue == "expert_desk" and queued.event.expert is True
    assert offered_to(by_phone) == [("generic:p", "l2agent")]
    report = eng.experts_report(10.0)
    (heinz,) = report["experts"]
    assert heinz["contacts"] == 3 and heinz["activity"] == "active_day"


def test_a_champions_answer_ends_the_question_and_counts_for_the_champion() -> None:
    eng = crowd()
    eng.handle(post("t1", "asker"), 0.0)  # type: ignore[arg-type]
    cmds = eng.handle(post("t1", "heinzf", "update", "Router neu starten"), 600.0)  # type: ignore[arg-type]
    (answered,) = events(cmds, "contact.answered_by_crowd")
    assert answered.event.by == "discourse:heinzf" and answered.event.by_expert == "heinz"
    assert answered.event.waited == 600.0
    assert offers(eng.handle(post("t2", "other"), 2000.0)) == []  # type: ignore[arg-type]
    (heinz,) = eng.experts_report(2000.0)["experts"]
    assert heinz["answers"] == 1 and heinz["last_answer"] == 600.0


def test_an_expert_reply_in_a_thread_we_never_saw_is_an_answer_not_a_question() -> None:
    eng = crowd()
    cmds = eng.handle(post("old-topic", "heinzf", "update", "Siehe FAQ"), 5.0)  # type: ignore[arg-type]
    assert [c.type for c in events(cmds)] == ["expert.answered"]
    assert eng.contact_info("discourse:old-topic") is None
    assert eng.experts_report(5.0)["experts"][0]["answers"] == 1


def test_an_expert_writing_in_their_own_thread_is_not_an_answer() -> None:
    eng = crowd()
    eng.handle(post("mine", "heinzf"), 0.0)  # type: ignore[arg-type]
    eng.handle(post("mine", "heinzf", "update", "Nachtrag"), 10.0)  # type: ignore[arg-type]
    (heinz,) = eng.experts_report(10.0)["experts"]
    assert heinz["answers"] == 0 and heinz["contacts"] == 1


def test_staff_in_the_thread_does_not_count_as_the_crowd() -> None:
    eng = crowd()
    eng.handle(post("t", "asker"), 0.0)  # type: ignore[arg-type]
    cmds = eng.handle(post("t", "moderator", "update", staff="true"), 60.0)  # type: ignore[arg-type]
    assert events(cmds, "contact.answered_by_crowd") == []
    assert eng.contact_info("discourse:t")["state"] == "crowd_window"  # type: ignore[index]


def test_a_question_needing_personal_data_skips_the_crowd() -> None:
    eng = crowd()
    cmds = eng.handle(post("bill", "asker", text="Meine Rechnung ist zu hoch"), 0.0)  # type: ignore[arg-type]
    assert offered_to(cmds) == [("discourse:bill", "mod")]


def test_experts_can_be_added_and_removed_at_runtime() -> None:
    eng = crowd()
    cmds = eng.handle(
        UpsertExpert(expert=Expert(id="maria", name="Maria", level=2, phones=("030 1234567",))),
        0.0,
    )
    assert events(cmds, "expert.updated")[0].event.keys == ("phone:+49301234567",)
    (queued,) = events(eng.handle(call("c1", phone="+49301234567"), 1.0), "contact.queued")
    assert queued.event.queue == "expert_desk"
    eng.handle(RemoveExpert(expert_id="maria"), 2.0)
    (queued,) = events(eng.handle(call("c2", phone="+49301234567"), 3.0), "contact.queued")
    assert queued.event.queue == "first"
    refused = eng.handle(RemoveExpert(expert_id="nobody"), 4.0)
    assert [c.reason for c in refused if isinstance(c, RefusedCmd)] == ["unknown_expert"]
    # the removal survives a restart
    restored = Engine.restore(eng.table, eng.snapshot())
    assert [e["id"] for e in restored.experts_report(5.0)["experts"]] == ["heinz"]


def test_linked_keys_make_one_customer_whose_email_shows_when_they_call() -> None:
    eng = crowd()
    (mail,) = offers(eng.handle(_mail(), 0.0))
    accept_and_complete(eng, mail, 1.0, 5.0)
    eng.handle(LinkKeys(keys=("email:Kunde@Example.org", "phone:030 5550001")), 10.0)
    cmds = eng.handle(call("call1", phone="+49305550001"), 100.0)
    (offer,) = [o for o in offers(cmds) if o.contact_id == "generic:call1"]
    assert [(h["contact_id"], h["channel"], h["subject"], h["outcome"]) for h in offer.history] == [
        ("email:root1", "email", "Router blinkt rot", "completed")
    ]
    info = eng.customer_info("phone:030 5550001")
    assert info is not None and sorted(info["keys"]) == [
        "email:kunde@example.org",
        "phone:+49305550001",
    ]
    bad = eng.handle(LinkKeys(keys=("fax:123",)), 200.0)
    assert [c.reason for c in bad if isinstance(c, RefusedCmd)] == ["bad_identity_key"]


def test_one_contact_carrying_two_keys_links_them_automatically() -> None:
    eng = crowd()
    eng.handle(_mail(), 0.0)
    # a chat widget that sends the logged-in customer's address with the chat handle
    eng.handle(
        call("chat1", channel="chat", handle="rocketchat:kunde", email="kunde@example.org"), 5.0
    )
    cmds = eng.handle(call("chat2", channel="chat", handle="rocketchat:kunde"), 50.0)
    (offer,) = [o for o in offers(cmds) if o.contact_id == "generic:chat2"]
    assert {h["contact_id"] for h in offer.history} == {"email:root1", "generic:chat1"}


def _mail() -> ContactEvent:
    return ContactEvent(
        kind="new",
        contact_id="email:root1",
        channel="email",
        source="email",
        external_id="root1",
        thread_id="root1",
        sender=Sender(email="kunde@example.org"),
        subject="Router blinkt rot",
        text="Seit gestern blinkt mein Router rot.",
    )
