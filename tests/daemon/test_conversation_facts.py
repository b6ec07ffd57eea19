"""What replies need from the journal: the mail thread (root first), the customer's address,
the time of the customer's last message, platform ids (real Redis)."""

from __future__ import annotations

import pytest

from channels.contact_event import ContactEvent, Sender
from router.daemon.journal import Journal
from router.daemon.replies import MAX_REFERENCES, ConversationFacts

pytestmark = pytest.mark.integration


def mail(message_id: str, kind: str = "update") -> ContactEvent:
    return ContactEvent(
        kind=kind,  # type: ignore[arg-type]
        contact_id="email:root@x",
        channel="email",
        source="email",
        external_id="root@x",
        sender=Sender(email="kunde@x"),
        to="support@example.net",
        subject="Frage" if kind == "new" else "Re: Frage",
        attributes={"message_id": message_id},
    )


async def test_mail_thread_keeps_its_root_and_first_subject(journal: Journal) -> None:
    facts = ConversationFacts(journal)
    await facts.record(mail("root@x", "new"), 10.0)
    for n in range(30):
        await facts.record(mail(f"m{n}@x"), 11.0 + n)
    got = await facts.get("email:root@x")
    chain = got["references"].split()
    assert chain[0] == "root@x" and chain[-1] == "m29@x" and len(chain) == MAX_REFERENCES
    assert (got["subject"], got["to"], got["email"]) == ("Frage", "support@example.net", "kunde@x")
    assert got["last_message_id"] == "m29@x" and float(got["last_inbound_at"]) == 40.0


async def test_community_staff_and_ends_do_not_count_as_the_customer(journal: Journal) -> None:
    facts = ConversationFacts(journal)

    def post(kind: str, user: str, **attributes: str) -> ContactEvent:
        return ContactEvent(
            kind=kind,  # type: ignore[arg-type]
            contact_id="discourse:7",
            channel="social",
            source="discourse",
            external_id="7",
            sender=Sender(handle=f"discourse:{user}"),
            attributes={"post_id": f"{user}-post", **attributes},
        )

    await facts.record(post("new", "kim"), 1.0)
    await facts.record(post("update", "clara"), 2.0)  # the crowd
    await facts.record(post("update", "support_team", staff="true"), 3.0)
    got = await facts.get("discourse:7")
    assert (got["handle"], got["last_message_id"], got["last_inbound_at"]) == (
        "discourse:kim",
        "kim-post",
        "1.0",
    )
    wa = ContactEvent(
        kind="update",
        contact_id="whatsapp:491",
        channel="chat",
        source="whatsapp",
        external_id="491",
        attributes={"phone_number_id": "1065", "message_id": "wamid.1"},
    )
    await facts.record(wa, 5.0)
    await facts.record(
        ContactEvent(
            kind="end",
            contact_id="whatsapp:491",
            channel="chat",
            source="whatsapp",
            external_id="491",
            end_reason="closed",
        ),
        9.0,
    )
    got = await facts.get("whatsapp:491")
    assert (got["phone_number_id"], got["last_inbound_at"]) == ("1065", "5.0")
