"""An unmodified exchangelib client against mock-ews.

Usage: exchangelib_client.py BASE_URL EMAIL PASSWORD [basic|ntlm]

Streams the inbox, receives the events of a mail injected through the control API, fetches
it with its MIME content and compares the bytes, syncs the folder, unsubscribes, sends a mail
with an inline image, lists the folder tree, and checks
that exchangelib raises its documented errors for an injected ErrorServerBusy and a 401.
Prints one line per step; exits non-zero at the first failure.
"""

import base64
import json
import sys
import urllib.request

from exchangelib import BASIC, DELEGATE, NTLM, UTC, Account, Build, Configuration, Credentials, FailFast, Version
from exchangelib.errors import ErrorServerBusy, UnauthorizedError
from exchangelib.properties import CreatedEvent, NewMailEvent

BASE, EMAIL, PASSWORD = sys.argv[1:4]
AUTH = {"basic": BASIC, "ntlm": NTLM}[sys.argv[4] if len(sys.argv) > 4 else "basic"]


def control(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read()
        return json.loads(text) if text else None


def step(text):
    print(text, flush=True)


config = Configuration(
    service_endpoint=f"{BASE}/EWS/Exchange.asmx",
    credentials=Credentials(EMAIL, PASSWORD),
    auth_type=AUTH,
    version=Version(build=Build(15, 1, 2507, 6), api_version="Exchange2016"),
    max_connections=4,
    retry_policy=FailFast(),
)
account = Account(EMAIL, config=config, autodiscover=False, access_type=DELEGATE, default_timezone=UTC)

with account.inbox.streaming_subscription() as subscription_id:
    step(f"subscribed {subscription_id}")
    injected = control("POST", f"/_control/mailboxes/{EMAIL}/messages", {
        "from": "bob@example.com", "from_name": "Bob", "subject": "Hello from mock-ews",
        "body": "First line\nSecond line", "message_id": "<exchangelib-test@example.com>",
    })
    item_id = injected["item_id"]
    seen = []
    for notification in account.inbox.get_streaming_events(subscription_id, connection_timeout=1):
        seen.extend(notification.events)
        if any(isinstance(e, NewMailEvent) and e.item_id.id == item_id for e in seen):
            break
    kinds = sorted({type(e).__name__ for e in seen})
    assert any(isinstance(e, CreatedEvent) and e.item_id.id == item_id for e in seen), kinds
    step(f"streamed events {kinds}")

    [message] = list(account.fetch(ids=[(item_id, None)], only_fields=["mime_content", "subject", "sender"]))
    sent = {m["item_id"]: m for m in control("GET", f"/_control/mailboxes/{EMAIL}/messages")}
    assert message.mime_content == base64.b64decode(sent[item_id]["mime_base64"]), message.mime_content
    assert message.subject == "Hello from mock-ews", message.subject
    assert message.sender.email_address == "bob@example.com", message.sender
    step(f"fetched {len(message.mime_content)} MIME bytes, identical to what was injected")

    changes = list(account.inbox.sync_items())
    created = [item.id for change, item in changes if change == "create"]
    assert item_id in created, changes
    assert account.inbox.item_sync_state, "no sync state kept"
    step(f"synced {len(changes)} changes")
step("unsubscribed")
assert control("GET", "/_control/stats")["live_subscriptions"] == 0

subjects = [m.subject for m in account.inbox.all().only("subject")]
assert subjects == ["Hello from mock-ews"], subjects
step(f"listed the inbox with FindItem: {subjects}")

# Without pinned auth and version, exchangelib probes both with ConvertId first. Other
# credentials, so that exchangelib's cache of detected protocols does not answer for the server.
control("POST", "/_control/mailboxes", {"email": "bob@contoso.example", "password": "bobs secret"})
probing = Configuration(service_endpoint=f"{BASE}/EWS/Exchange.asmx", credentials=Credentials("bob@contoso.example", "bobs secret"))
probed = Account("bob@contoso.example", config=probing, autodiscover=False, access_type=DELEGATE, default_timezone=UTC)
assert probed.inbox.total_count == 0, probed.inbox.total_count
assert probed.protocol.auth_type == AUTH, probed.protocol.auth_type
step(f"probed auth {probed.protocol.auth_type} and version {probed.protocol.version.api_version}")

# Send a mail with an inline image to a mailbox on the server: it arrives there, and the sender
# keeps a copy in Sent Items.
from exchangelib import FileAttachment, HTMLBody, Message

mail = Message(
    account=account,
    subject="Sent by exchangelib",
    body=HTMLBody('<p>Logo: <img src="cid:logo"></p>'),
    to_recipients=["bob@contoso.example"],
)
mail.attach(FileAttachment(name="logo.png", content=b"\x89PNG\r\n", content_id="logo", is_inline=True))
mail.send_and_save()
[arrived] = control("GET", "/_control/mailboxes/bob@contoso.example/messages")
assert arrived["subject"] == "Sent by exchangelib", arrived
assert b"Content-ID: <logo>" in base64.b64decode(arrived["mime_base64"]), arrived
[copy] = control("GET", f"/_control/mailboxes/{EMAIL}/sent-items")
assert copy["message_id"] == arrived["message_id"], (copy, arrived)
step(f"sent a mail with CreateItem: {arrived['message_id']}")

# The folder tree, as a client lists it for a user to choose from.
names = sorted(f.name for f in account.msg_folder_root.walk())
assert "Projects" in names and "Sent Items" in names and "Calendar" in names, names
step(f"listed {len(names)} folders with FindFolder: {names}")

control("POST", "/_control/faults", {"kind": "server_busy", "back_off_ms": 2000, "operation": "GetItem"})
try:
    list(account.fetch(ids=[(item_id, None)], only_fields=["subject"]))
    raise AssertionError("no ErrorServerBusy raised")
except ErrorServerBusy as e:
    assert e.back_off == 2, e.back_off
    step(f"ErrorServerBusy raised, back off {e.back_off} s")

control("POST", "/_control/faults", {"kind": "unauthorized", "operation": "GetItem"})
try:
    list(account.fetch(ids=[(item_id, None)], only_fields=["subject"]))
    raise AssertionError("no UnauthorizedError raised")
except UnauthorizedError as e:
    step(f"UnauthorizedError raised: {e}")
wrong = Configuration(
    service_endpoint=f"{BASE}/EWS/Exchange.asmx",
    credentials=Credentials(EMAIL, "not the password"),
    auth_type=AUTH,
    version=Version(build=Build(15, 1, 2507, 6), api_version="Exchange2016"),
    retry_policy=FailFast(),
)
try:
    Account(EMAIL, config=wrong, autodiscover=False, access_type=DELEGATE, default_timezone=UTC).inbox.total_count
    raise AssertionError("a wrong password was let in")
except UnauthorizedError:
    step("a wrong password is refused")
step("ok")
