//! SOAP request bodies for the operations the listener uses.
//!
//! Every builder returns a complete envelope as a `String`, ready to POST with
//! `Content-Type: text/xml; charset=utf-8`. All text and attribute values are escaped here, so
//! callers pass raw values.

use std::fmt::Write as _;

use quick_xml::escape::escape;

/// The `t:RequestServerVersion` a request claims. Streaming needs at least `Exchange2010_SP1`.
/// Ordered oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ServerVersion {
    Exchange2010Sp1,
    Exchange2010Sp2,
    Exchange2013,
    #[default]
    Exchange2013Sp1,
    Exchange2016,
}

impl ServerVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerVersion::Exchange2010Sp1 => "Exchange2010_SP1",
            ServerVersion::Exchange2010Sp2 => "Exchange2010_SP2",
            ServerVersion::Exchange2013 => "Exchange2013",
            ServerVersion::Exchange2013Sp1 => "Exchange2013_SP1",
            ServerVersion::Exchange2016 => "Exchange2016",
        }
    }

    /// Every version, oldest first; the first is the oldest with streaming notifications.
    pub const ALL: [ServerVersion; 5] = [
        ServerVersion::Exchange2010Sp1,
        ServerVersion::Exchange2010Sp2,
        ServerVersion::Exchange2013,
        ServerVersion::Exchange2013Sp1,
        ServerVersion::Exchange2016,
    ];

    /// Parses the wire spelling (`Exchange2013_SP1`), case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        ServerVersion::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
    }

    /// The version just below this one, if streaming has one.
    pub fn older(self) -> Option<Self> {
        ServerVersion::ALL.into_iter().rev().find(|v| *v < self)
    }
}

/// What goes into `soap:Header` of every request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHeader {
    pub version: ServerVersion,
    /// Act as this mailbox (`t:ExchangeImpersonation` by primary SMTP address).
    pub impersonate: Option<String>,
}

/// The distinguished folder ids of mail folders and the folders around them.
pub const DISTINGUISHED_IDS: [&str; 14] = [
    "inbox",
    "sentitems",
    "drafts",
    "deleteditems",
    "junkemail",
    "outbox",
    "msgfolderroot",
    "root",
    "archiveinbox",
    "calendar",
    "contacts",
    "tasks",
    "notes",
    "journal",
];

/// A folder a request names: a well-known one by its distinguished id (optionally in another
/// mailbox than the caller's), or any folder by its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FolderRef {
    /// `inbox`, `root`, `sentitems`, ..., or a folder id.
    pub id: String,
    pub mailbox: Option<String>,
    /// A distinguished id, not a folder id.
    pub distinguished: bool,
}

impl FolderRef {
    /// A well-known folder by its distinguished id (`inbox`, `sentitems`, `drafts`, ...).
    pub fn distinguished(id: &str, mailbox: Option<&str>) -> Self {
        FolderRef {
            id: id.to_owned(),
            mailbox: mailbox.map(str::to_owned),
            distinguished: true,
        }
    }

    /// A folder as a string names it: a distinguished id when it is one of EWS's well-known
    /// names (`inbox`, `sentitems`, ...), else a folder id (which never looks like one).
    pub fn named(id: &str) -> Self {
        if DISTINGUISHED_IDS.contains(&id) {
            Self::distinguished(id, None)
        } else {
            Self::by_id(id)
        }
    }

    /// Any folder, by the id the server gave it.
    pub fn by_id(id: &str) -> Self {
        FolderRef {
            id: id.to_owned(),
            mailbox: None,
            distinguished: false,
        }
    }

    pub fn inbox(mailbox: Option<&str>) -> Self {
        Self::distinguished("inbox", mailbox)
    }

    /// Where a sent message's copy is kept.
    pub fn sent_items(mailbox: Option<&str>) -> Self {
        Self::distinguished("sentitems", mailbox)
    }

    /// The top of the mailbox's folders that hold mail, calendars, contacts and tasks (the
    /// "Top of Information Store").
    pub fn message_root(mailbox: Option<&str>) -> Self {
        Self::distinguished("msgfolderroot", mailbox)
    }

    fn write(&self, out: &mut String) {
        if !self.distinguished {
            let _ = write!(out, r#"<t:FolderId Id="{}"/>"#, escape(&self.id));
            return;
        }
        let _ = write!(out, r#"<t:DistinguishedFolderId Id="{}""#, escape(&self.id));
        match &self.mailbox {
            Some(mb) => {
                let _ = write!(
                    out,
                    "><t:Mailbox><t:EmailAddress>{}</t:EmailAddress></t:Mailbox></t:DistinguishedFolderId>",
                    escape(mb)
                );
            }
            None => out.push_str("/>"),
        }
    }
}

/// Notification event types a subscription can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    NewMail,
    Created,
    Deleted,
    Modified,
    Moved,
    Copied,
    FreeBusyChanged,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::NewMail => "NewMailEvent",
            EventType::Created => "CreatedEvent",
            EventType::Deleted => "DeletedEvent",
            EventType::Modified => "ModifiedEvent",
            EventType::Moved => "MovedEvent",
            EventType::Copied => "CopiedEvent",
            EventType::FreeBusyChanged => "FreeBusyChangedEvent",
        }
    }
}

/// `t:BaseShape` of an item request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseShape {
    IdOnly,
    Default,
    AllProperties,
}

impl BaseShape {
    fn as_str(self) -> &'static str {
        match self {
            BaseShape::IdOnly => "IdOnly",
            BaseShape::Default => "Default",
            BaseShape::AllProperties => "AllProperties",
        }
    }
}

/// `m:ItemShape` of a GetItem request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemShape {
    pub base: BaseShape,
    pub include_mime: bool,
    /// `FieldURI`s such as `item:Subject` or `message:InternetMessageId`.
    pub additional: Vec<&'static str>,
}

impl ItemShape {
    /// What a mail handed to Creatio needs: subject, sender, recipients, body, dates and the
    /// RFC 5322 Message-ID, without the MIME content.
    pub fn full_message() -> Self {
        ItemShape {
            base: BaseShape::IdOnly,
            include_mime: false,
            additional: vec![
                "item:Subject",
                "item:Body",
                "item:DateTimeReceived",
                "item:DateTimeSent",
                "item:Importance",
                "message:Sender",
                "message:From",
                "message:ToRecipients",
                "message:CcRecipients",
                "message:InternetMessageId",
            ],
        }
    }

    /// [`ItemShape::full_message`] plus the base64 MIME content.
    pub fn full_message_with_mime() -> Self {
        ItemShape {
            include_mime: true,
            ..Self::full_message()
        }
    }
}

/// Opens an envelope with the standard namespaces and header, runs `body` to write the
/// operation element, and closes it.
fn envelope(header: &RequestHeader, body: impl FnOnce(&mut String)) -> String {
    let mut out = String::with_capacity(1024);
    out.push_str(concat!(
        r#"<?xml version="1.0" encoding="utf-8"?>"#,
        r#"<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/""#,
        r#" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types""#,
        r#" xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">"#,
        "<soap:Header>"
    ));
    let _ = write!(
        out,
        r#"<t:RequestServerVersion Version="{}"/>"#,
        header.version.as_str()
    );
    if let Some(who) = &header.impersonate {
        let _ = write!(
            out,
            "<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>",
            escape(who)
        );
    }
    out.push_str("</soap:Header><soap:Body>");
    body(&mut out);
    out.push_str("</soap:Body></soap:Envelope>");
    out
}

/// `Subscribe` with a `StreamingSubscriptionRequest` on these folders.
pub fn subscribe_streaming(
    header: &RequestHeader,
    folders: &[FolderRef],
    events: &[EventType],
) -> String {
    envelope(header, |out| {
        out.push_str("<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds>");
        for folder in folders {
            folder.write(out);
        }
        out.push_str("</t:FolderIds><t:EventTypes>");
        for ev in events {
            let _ = write!(out, "<t:EventType>{}</t:EventType>", ev.as_str());
        }
        out.push_str("</t:EventTypes></m:StreamingSubscriptionRequest></m:Subscribe>");
    })
}

/// The connection timeout EWS accepts on `GetStreamingEvents`: 1 to 30 minutes.
pub const CONNECTION_TIMEOUT_MINUTES: std::ops::RangeInclusive<u8> = 1..=30;
/// The most subscription ids one `GetStreamingEvents` may carry.
pub const MAX_STREAM_SUBSCRIPTIONS: usize = 200;

/// `GetStreamingEvents` for up to 200 subscriptions. The timeout is clamped into 1..=30
/// minutes and the ids are truncated to the first 200, the limits every server enforces.
pub fn get_streaming_events(
    header: &RequestHeader,
    subscription_ids: &[&str],
    timeout_minutes: u8,
) -> String {
    let timeout = timeout_minutes.clamp(
        *CONNECTION_TIMEOUT_MINUTES.start(),
        *CONNECTION_TIMEOUT_MINUTES.end(),
    );
    envelope(header, |out| {
        out.push_str("<m:GetStreamingEvents><m:SubscriptionIds>");
        for id in subscription_ids.iter().take(MAX_STREAM_SUBSCRIPTIONS) {
            let _ = write!(out, "<t:SubscriptionId>{}</t:SubscriptionId>", escape(*id));
        }
        let _ = write!(
            out,
            "</m:SubscriptionIds><m:ConnectionTimeout>{timeout}</m:ConnectionTimeout></m:GetStreamingEvents>"
        );
    })
}

/// `GetItem` for the given item ids.
pub fn get_item(header: &RequestHeader, item_ids: &[&str], shape: &ItemShape) -> String {
    envelope(header, |out| {
        let _ = write!(
            out,
            "<m:GetItem><m:ItemShape><t:BaseShape>{}</t:BaseShape>",
            shape.base.as_str()
        );
        if shape.include_mime {
            out.push_str("<t:IncludeMimeContent>true</t:IncludeMimeContent>");
        }
        if !shape.additional.is_empty() {
            out.push_str("<t:AdditionalProperties>");
            for field in &shape.additional {
                let _ = write!(out, r#"<t:FieldURI FieldURI="{}"/>"#, escape(*field));
            }
            out.push_str("</t:AdditionalProperties>");
        }
        out.push_str("</m:ItemShape><m:ItemIds>");
        for id in item_ids {
            let _ = write!(out, r#"<t:ItemId Id="{}"/>"#, escape(*id));
        }
        out.push_str("</m:ItemIds></m:GetItem>");
    })
}

/// `Unsubscribe` one subscription.
pub fn unsubscribe(header: &RequestHeader, subscription_id: &str) -> String {
    envelope(header, |out| {
        let _ = write!(
            out,
            "<m:Unsubscribe><m:SubscriptionId>{}</m:SubscriptionId></m:Unsubscribe>",
            escape(subscription_id)
        );
    })
}

/// The most changes one `SyncFolderItems` may ask for.
pub const MAX_SYNC_CHANGES: u16 = 512;

/// `SyncFolderItems` with the id shape, from `sync_state` (or from the beginning when `None`).
/// `max_changes` is clamped into 1..=512.
pub fn sync_folder_items(
    header: &RequestHeader,
    folder: &FolderRef,
    sync_state: Option<&str>,
    max_changes: u16,
) -> String {
    envelope(header, |out| {
        out.push_str("<m:SyncFolderItems><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape><m:SyncFolderId>");
        folder.write(out);
        out.push_str("</m:SyncFolderId>");
        if let Some(state) = sync_state {
            let _ = write!(out, "<m:SyncState>{}</m:SyncState>", escape(state));
        }
        let _ = write!(
            out,
            "<m:MaxChangesReturned>{}</m:MaxChangesReturned></m:SyncFolderItems>",
            max_changes.clamp(1, MAX_SYNC_CHANGES)
        );
    })
}

/// What a `FindItem` asks for: a page, which items, in which order.
struct FindQuery<'a> {
    /// Each item's received time besides its id.
    with_received: bool,
    offset: u32,
    max_entries: u16,
    /// The restriction's test, field and constant (`IsEqualTo`,
    /// `message:InternetMessageId`, the Message-ID).
    restriction: Option<(&'a str, &'a str, &'a str)>,
    /// `Ascending` or `Descending` by received time; the server's order when `None`.
    order: Option<&'a str>,
}

/// `FindItem` on a folder, its elements in the schema's order (`ItemShape`,
/// `IndexedPageItemView`, `Restriction`, `SortOrder`, `ParentFolderIds`).
fn find_items(header: &RequestHeader, folder: &FolderRef, query: &FindQuery<'_>) -> String {
    envelope(header, |out| {
        out.push_str(
            r#"<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>"#,
        );
        if query.with_received {
            out.push_str(r#"<t:AdditionalProperties><t:FieldURI FieldURI="item:DateTimeReceived"/></t:AdditionalProperties>"#);
        }
        let _ = write!(
            out,
            r#"</m:ItemShape><m:IndexedPageItemView MaxEntriesReturned="{}" Offset="{}" BasePoint="Beginning"/>"#,
            query.max_entries.clamp(1, MAX_FIND_ENTRIES),
            query.offset
        );
        if let Some((test, field, value)) = query.restriction {
            let _ = write!(
                out,
                concat!(
                    r#"<m:Restriction><t:{test}><t:FieldURI FieldURI="{field}"/>"#,
                    r#"<t:FieldURIOrConstant><t:Constant Value="{value}"/></t:FieldURIOrConstant></t:{test}></m:Restriction>"#
                ),
                test = test,
                field = field,
                value = escape(value)
            );
        }
        if let Some(order) = query.order {
            let _ = write!(
                out,
                r#"<m:SortOrder><t:FieldOrder Order="{order}"><t:FieldURI FieldURI="item:DateTimeReceived"/></t:FieldOrder></m:SortOrder>"#
            );
        }
        out.push_str("<m:ParentFolderIds>");
        folder.write(out);
        out.push_str("</m:ParentFolderIds></m:FindItem>");
    })
}

/// `FindItem` on a folder, newest first by received time: one page of item ids with their
/// received times, from `offset`. For finding what arrived since a moment, when no sync state
/// can say it.
pub fn find_recent_items(
    header: &RequestHeader,
    folder: &FolderRef,
    offset: u32,
    max_entries: u16,
) -> String {
    let query = FindQuery {
        with_received: true,
        offset,
        max_entries,
        restriction: None,
        order: Some("Descending"),
    };
    find_items(header, folder, &query)
}

/// `FindItem` on a folder for the items received at or after `since` (an `xs:dateTime`),
/// oldest first: one page of item ids with their received times, from `offset`. For loading a
/// mailbox's history in order.
pub fn find_received_since(
    header: &RequestHeader,
    folder: &FolderRef,
    since: &str,
    offset: u32,
    max_entries: u16,
) -> String {
    let query = FindQuery {
        with_received: true,
        offset,
        max_entries,
        restriction: Some(("IsGreaterThanOrEqualTo", "item:DateTimeReceived", since)),
        order: Some("Ascending"),
    };
    find_items(header, folder, &query)
}

/// `FindItem` on a folder for the items whose `Message-ID` is `message_id` (the
/// `InternetMessageId` Creatio knows a mail by): their ids, at most ten.
pub fn find_by_message_id(header: &RequestHeader, folder: &FolderRef, message_id: &str) -> String {
    let query = FindQuery {
        with_received: false,
        offset: 0,
        max_entries: 10,
        restriction: Some(("IsEqualTo", "message:InternetMessageId", message_id)),
        order: None,
    };
    find_items(header, folder, &query)
}

/// A recipient: an SMTP address and, when known, the name shown with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub name: Option<String>,
    pub email: String,
}

/// A file sent with a message, its content already base64-encoded (as Creatio hands it over,
/// so it is copied into the request once and never decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingAttachment {
    pub name: String,
    pub content_type: Option<String>,
    /// Without angle brackets: the HTML body shows the file where it links `cid:<content_id>`.
    pub content_id: Option<String>,
    pub is_inline: bool,
    pub content_base64: String,
}

/// A message to send, as `CreateItem` takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub subject: String,
    pub body: String,
    pub body_is_html: bool,
    /// `Low`, `Normal` or `High`.
    pub importance: Option<&'static str>,
    pub to: Vec<Recipient>,
    pub cc: Vec<Recipient>,
    pub bcc: Vec<Recipient>,
    /// With its angle brackets; the server makes one up when absent.
    pub internet_message_id: Option<String>,
    pub in_reply_to: Option<String>,
    pub references: Option<String>,
    pub attachments: Vec<OutgoingAttachment>,
}

impl OutgoingMessage {
    /// Roughly how many bytes the request carries: what a size limit is checked against.
    pub fn encoded_len(&self) -> usize {
        let recipients: usize = [&self.to, &self.cc, &self.bcc]
            .iter()
            .flat_map(|list| list.iter())
            .map(|r| r.email.len() + r.name.as_ref().map_or(0, String::len) + 96)
            .sum();
        let attachments: usize = self
            .attachments
            .iter()
            .map(|a| a.content_base64.len() + a.name.len() + 256)
            .sum();
        self.subject.len() + self.body.len() * 6 / 5 + recipients + attachments + 2048
    }
}

fn write_recipients(out: &mut String, element: &str, list: &[Recipient]) {
    if list.is_empty() {
        return;
    }
    let _ = write!(out, "<t:{element}>");
    for r in list {
        out.push_str("<t:Mailbox>");
        if let Some(name) = r.name.as_deref().filter(|n| !n.is_empty()) {
            let _ = write!(out, "<t:Name>{}</t:Name>", escape(name));
        }
        let _ = write!(
            out,
            "<t:EmailAddress>{}</t:EmailAddress></t:Mailbox>",
            escape(&r.email)
        );
    }
    let _ = write!(out, "</t:{element}>");
}

/// `CreateItem` that sends a message and keeps a copy in Sent Items
/// (`MessageDisposition="SendAndSaveCopy"`), its attachments in the same request. Elements
/// follow the schema's order (`ItemType`'s, then `MessageType`'s), which strict servers check.
pub fn send_message(
    header: &RequestHeader,
    saved_to: &FolderRef,
    message: &OutgoingMessage,
) -> String {
    envelope(header, |out| {
        out.reserve(message.encoded_len());
        out.push_str(r#"<m:CreateItem MessageDisposition="SendAndSaveCopy"><m:SavedItemFolderId>"#);
        saved_to.write(out);
        out.push_str("</m:SavedItemFolderId><m:Items><t:Message>");
        let _ = write!(
            out,
            r#"<t:Subject>{}</t:Subject><t:Body BodyType="{}">{}</t:Body>"#,
            escape(&message.subject),
            if message.body_is_html { "HTML" } else { "Text" },
            escape(&message.body)
        );
        if !message.attachments.is_empty() {
            out.push_str("<t:Attachments>");
            for a in &message.attachments {
                let _ = write!(
                    out,
                    "<t:FileAttachment><t:Name>{}</t:Name>",
                    escape(&a.name)
                );
                if let Some(ct) = &a.content_type {
                    let _ = write!(out, "<t:ContentType>{}</t:ContentType>", escape(ct));
                }
                if let Some(cid) = &a.content_id {
                    let _ = write!(out, "<t:ContentId>{}</t:ContentId>", escape(cid));
                }
                let _ = write!(out, "<t:IsInline>{}</t:IsInline><t:Content>", a.is_inline);
                // Base64's alphabet needs no escaping.
                out.push_str(&a.content_base64);
                out.push_str("</t:Content></t:FileAttachment>");
            }
            out.push_str("</t:Attachments>");
        }
        if let Some(importance) = message.importance {
            let _ = write!(out, "<t:Importance>{importance}</t:Importance>");
        }
        if let Some(v) = message.in_reply_to.as_deref().filter(|v| !v.is_empty()) {
            let _ = write!(out, "<t:InReplyTo>{}</t:InReplyTo>", escape(v));
        }
        write_recipients(out, "ToRecipients", &message.to);
        write_recipients(out, "CcRecipients", &message.cc);
        write_recipients(out, "BccRecipients", &message.bcc);
        if let Some(v) = message
            .internet_message_id
            .as_deref()
            .filter(|v| !v.is_empty())
        {
            let _ = write!(
                out,
                "<t:InternetMessageId>{}</t:InternetMessageId>",
                escape(v)
            );
        }
        if let Some(v) = message.references.as_deref().filter(|v| !v.is_empty()) {
            let _ = write!(out, "<t:References>{}</t:References>", escape(v));
        }
        out.push_str("</t:Message></m:Items></m:CreateItem>");
    })
}

/// The most items one FindItem page may ask for.
pub const MAX_FIND_ENTRIES: u16 = 1000;

/// `FindFolder` below a folder, every level deep: one page of folder ids with their parent,
/// display name and class, from `offset`. For listing the folders a user may choose from.
pub fn find_folders(
    header: &RequestHeader,
    parent: &FolderRef,
    offset: u32,
    max_entries: u16,
) -> String {
    envelope(header, |out| {
        out.push_str(concat!(
            r#"<m:FindFolder Traversal="Deep"><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape>"#,
            "<t:AdditionalProperties>",
            r#"<t:FieldURI FieldURI="folder:ParentFolderId"/>"#,
            r#"<t:FieldURI FieldURI="folder:DisplayName"/>"#,
            r#"<t:FieldURI FieldURI="folder:FolderClass"/>"#,
            "</t:AdditionalProperties></m:FolderShape>"
        ));
        let _ = write!(
            out,
            r#"<m:IndexedPageFolderView MaxEntriesReturned="{}" Offset="{offset}" BasePoint="Beginning"/>"#,
            max_entries.clamp(1, MAX_FIND_ENTRIES)
        );
        out.push_str("<m:ParentFolderIds>");
        parent.write(out);
        out.push_str("</m:ParentFolderIds></m:FindFolder>");
    })
}

/// `GetFolder` with the id shape plus display name and counts: a cheap authenticated call
/// that proves the credentials reach the folder.
pub fn get_folder(header: &RequestHeader, folder: &FolderRef) -> String {
    get_folders(header, std::slice::from_ref(folder))
}

/// `GetFolder` of several folders at once: one response message each, in order.
pub fn get_folders(header: &RequestHeader, folders: &[FolderRef]) -> String {
    envelope(header, |out| {
        out.push_str(concat!(
            "<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape>",
            "<t:AdditionalProperties>",
            r#"<t:FieldURI FieldURI="folder:DisplayName"/>"#,
            r#"<t:FieldURI FieldURI="folder:TotalCount"/>"#,
            "</t:AdditionalProperties></m:FolderShape><m:FolderIds>"
        ));
        for folder in folders {
            folder.write(out);
        }
        out.push_str("</m:FolderIds></m:GetFolder>");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ns::{MESSAGES, SOAP, TYPES};
    use crate::xml::parse;
    use proptest::prelude::*;

    fn header() -> RequestHeader {
        RequestHeader {
            version: ServerVersion::Exchange2013Sp1,
            impersonate: Some("alice@contoso.example".into()),
        }
    }

    fn outgoing() -> OutgoingMessage {
        OutgoingMessage {
            subject: "Q3 <plan> & budget".into(),
            body: "<p>See <img src=\"cid:logo\"></p>".into(),
            body_is_html: true,
            importance: Some("High"),
            to: vec![Recipient {
                name: Some("Bob".into()),
                email: "bob@contoso.example".into(),
            }],
            cc: vec![],
            bcc: vec![Recipient {
                name: None,
                email: "audit@contoso.example".into(),
            }],
            internet_message_id: Some("<abc@creatio.example>".into()),
            in_reply_to: Some("<prev@contoso.example>".into()),
            references: Some("<root@contoso.example> <prev@contoso.example>".into()),
            attachments: vec![OutgoingAttachment {
                name: "logo.png".into(),
                content_type: Some("image/png".into()),
                content_id: Some("logo".into()),
                is_inline: true,
                content_base64: "iVBORw0KGgo=".into(),
            }],
        }
    }

    #[test]
    fn send_message_follows_the_schemas_order_and_escapes_text() {
        let xml = send_message(&header(), &FolderRef::sent_items(None), &outgoing());
        let root = parse(xml.as_bytes()).unwrap();
        let create = root
            .path(&[(SOAP, "Body"), (MESSAGES, "CreateItem")])
            .unwrap();
        assert_eq!(create.attr("MessageDisposition"), Some("SendAndSaveCopy"));
        let saved = create
            .path(&[
                (MESSAGES, "SavedItemFolderId"),
                (TYPES, "DistinguishedFolderId"),
            ])
            .unwrap();
        assert_eq!(saved.attr("Id"), Some("sentitems"));
        let message = create
            .path(&[(MESSAGES, "Items"), (TYPES, "Message")])
            .unwrap();
        let order: Vec<&str> = message.children.iter().map(|c| c.local.as_str()).collect();
        assert_eq!(
            order,
            [
                "Subject",
                "Body",
                "Attachments",
                "Importance",
                "InReplyTo",
                "ToRecipients",
                "BccRecipients",
                "InternetMessageId",
                "References"
            ]
        );
        assert_eq!(
            message.child_text(TYPES, "Subject"),
            Some("Q3 <plan> & budget")
        );
        let body = message.child(TYPES, "Body").unwrap();
        assert_eq!(body.attr("BodyType"), Some("HTML"));
        assert_eq!(body.text.as_str(), "<p>See <img src=\"cid:logo\"></p>");
        let file = message
            .path(&[(TYPES, "Attachments"), (TYPES, "FileAttachment")])
            .unwrap();
        let order: Vec<&str> = file.children.iter().map(|c| c.local.as_str()).collect();
        assert_eq!(
            order,
            ["Name", "ContentType", "ContentId", "IsInline", "Content"]
        );
        assert_eq!(file.child_text(TYPES, "Content"), Some("iVBORw0KGgo="));
        let bob = message
            .path(&[(TYPES, "ToRecipients"), (TYPES, "Mailbox")])
            .unwrap();
        assert_eq!(bob.child_text(TYPES, "Name"), Some("Bob"));
        assert_eq!(
            bob.child_text(TYPES, "EmailAddress"),
            Some("bob@contoso.example")
        );
        assert!(xml.len() <= outgoing().encoded_len() + 1024);
    }

    #[test]
    fn a_plain_message_leaves_out_what_it_does_not_have() {
        let message = OutgoingMessage {
            subject: "hi".into(),
            body: "text".into(),
            to: vec![Recipient {
                name: None,
                email: "bob@contoso.example".into(),
            }],
            ..OutgoingMessage::default()
        };
        let xml = send_message(&header(), &FolderRef::sent_items(None), &message);
        let root = parse(xml.as_bytes()).unwrap();
        let message = root
            .path(&[
                (SOAP, "Body"),
                (MESSAGES, "CreateItem"),
                (MESSAGES, "Items"),
                (TYPES, "Message"),
            ])
            .unwrap();
        let order: Vec<&str> = message.children.iter().map(|c| c.local.as_str()).collect();
        assert_eq!(order, ["Subject", "Body", "ToRecipients"]);
        assert_eq!(
            message.child(TYPES, "Body").unwrap().attr("BodyType"),
            Some("Text")
        );
    }

    #[test]
    fn find_received_since_asks_oldest_first_from_a_moment() {
        let xml = find_received_since(
            &header(),
            &FolderRef::inbox(None),
            "2026-12-01T00:00:00Z",
            50,
            100,
        );
        let root = parse(xml.as_bytes()).unwrap();
        let find = root
            .path(&[(SOAP, "Body"), (MESSAGES, "FindItem")])
            .unwrap();
        let order: Vec<&str> = find.children.iter().map(|c| c.local.as_str()).collect();
        assert_eq!(
            order,
            [
                "ItemShape",
                "IndexedPageItemView",
                "Restriction",
                "SortOrder",
                "ParentFolderIds"
            ]
        );
        let since = find
            .path(&[
                (MESSAGES, "Restriction"),
                (TYPES, "IsGreaterThanOrEqualTo"),
                (TYPES, "FieldURIOrConstant"),
                (TYPES, "Constant"),
            ])
            .unwrap();
        assert_eq!(since.attr("Value"), Some("2026-12-01T00:00:00Z"));
        let sort = find
            .path(&[(MESSAGES, "SortOrder"), (TYPES, "FieldOrder")])
            .unwrap();
        assert_eq!(sort.attr("Order"), Some("Ascending"));
        assert_eq!(
            find.child(MESSAGES, "IndexedPageItemView")
                .unwrap()
                .attr("Offset"),
            Some("50")
        );
    }

    #[test]
    fn find_recent_items_asks_newest_first_with_received_times() {
        let xml = find_recent_items(&header(), &FolderRef::inbox(None), 200, 5000);
        let root = parse(xml.as_bytes()).unwrap();
        let find = root
            .path(&[(SOAP, "Body"), (MESSAGES, "FindItem")])
            .unwrap();
        assert_eq!(find.attr("Traversal"), Some("Shallow"));
        let order: Vec<&str> = find.children.iter().map(|c| c.local.as_str()).collect();
        // The schema's order.
        assert_eq!(
            order,
            [
                "ItemShape",
                "IndexedPageItemView",
                "SortOrder",
                "ParentFolderIds"
            ]
        );
        let view = find.child(MESSAGES, "IndexedPageItemView").unwrap();
        assert_eq!(view.attr("Offset"), Some("200"));
        assert_eq!(view.attr("MaxEntriesReturned"), Some("1000"));
        let sort = find
            .path(&[(MESSAGES, "SortOrder"), (TYPES, "FieldOrder")])
            .unwrap();
        assert_eq!(sort.attr("Order"), Some("Descending"));
        assert_eq!(
            sort.child(TYPES, "FieldURI").unwrap().attr("FieldURI"),
            Some("item:DateTimeReceived")
        );
    }

    #[test]
    fn a_subscription_names_every_folder_it_watches() {
        let xml = subscribe_streaming(
            &header(),
            &[FolderRef::inbox(None), FolderRef::by_id("AAMkFolder=")],
            &[EventType::NewMail],
        );
        let root = parse(xml.as_bytes()).unwrap();
        let ids = root
            .path(&[
                (SOAP, "Body"),
                (MESSAGES, "Subscribe"),
                (MESSAGES, "StreamingSubscriptionRequest"),
                (TYPES, "FolderIds"),
            ])
            .unwrap();
        let named: Vec<(&str, Option<&str>)> = ids
            .children
            .iter()
            .map(|c| (c.local.as_str(), c.attr("Id")))
            .collect();
        assert_eq!(
            named,
            [
                ("DistinguishedFolderId", Some("inbox")),
                ("FolderId", Some("AAMkFolder="))
            ]
        );
    }

    #[test]
    fn subscribe_has_the_reference_shape() {
        let xml = subscribe_streaming(
            &header(),
            &[FolderRef::inbox(Some("alice@contoso.example"))],
            &[EventType::NewMail, EventType::Created],
        );
        let root = parse(xml.as_bytes()).unwrap();
        assert!(root.is(SOAP, "Envelope"));
        let version = root
            .path(&[(SOAP, "Header"), (TYPES, "RequestServerVersion")])
            .unwrap();
        assert_eq!(version.attr("Version"), Some("Exchange2013_SP1"));
        let req = root
            .path(&[
                (SOAP, "Body"),
                (MESSAGES, "Subscribe"),
                (MESSAGES, "StreamingSubscriptionRequest"),
            ])
            .unwrap();
        let folder = req
            .path(&[(TYPES, "FolderIds"), (TYPES, "DistinguishedFolderId")])
            .unwrap();
        assert_eq!(folder.attr("Id"), Some("inbox"));
        let types: Vec<_> = req
            .child(TYPES, "EventTypes")
            .unwrap()
            .children_named(TYPES, "EventType")
            .map(|e| e.text.as_str())
            .collect();
        assert_eq!(types, ["NewMailEvent", "CreatedEvent"]);
    }

    #[test]
    fn streaming_request_clamps_timeout_and_caps_ids() {
        let ids: Vec<String> = (0..250).map(|i| format!("id{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let root = parse(get_streaming_events(&header(), &refs, 90).as_bytes()).unwrap();
        let gse = root
            .path(&[(SOAP, "Body"), (MESSAGES, "GetStreamingEvents")])
            .unwrap();
        assert_eq!(gse.child_text(MESSAGES, "ConnectionTimeout"), Some("30"));
        let n = gse
            .child(MESSAGES, "SubscriptionIds")
            .unwrap()
            .children_named(TYPES, "SubscriptionId")
            .count();
        assert_eq!(n, MAX_STREAM_SUBSCRIPTIONS);
    }

    #[test]
    fn sync_request_carries_state_and_clamped_limit() {
        let xml = sync_folder_items(&header(), &FolderRef::inbox(None), Some("H4sI&"), 9999);
        let root = parse(xml.as_bytes()).unwrap();
        let sync = root
            .path(&[(SOAP, "Body"), (MESSAGES, "SyncFolderItems")])
            .unwrap();
        assert_eq!(sync.child_text(MESSAGES, "SyncState"), Some("H4sI&"));
        assert_eq!(sync.child_text(MESSAGES, "MaxChangesReturned"), Some("512"));
        let names: Vec<_> = sync.children.iter().map(|c| c.local.as_str()).collect();
        assert_eq!(
            names,
            [
                "ItemShape",
                "SyncFolderId",
                "SyncState",
                "MaxChangesReturned"
            ]
        );
        let fresh = sync_folder_items(&header(), &FolderRef::inbox(None), None, 10);
        assert!(!fresh.contains("SyncState"));
    }

    proptest! {
        /// Whatever a caller passes, the request stays well-formed and carries the value back
        /// unchanged (escaping round-trips).
        #[test]
        fn values_round_trip_through_escaping(
            sub in "[^\u{0}-\u{1f}\u{fffe}\u{ffff}]{1,40}",
            item in "[^\u{0}-\u{1f}\u{fffe}\u{ffff}]{1,40}",
        ) {
            let root = parse(unsubscribe(&header(), &sub).as_bytes()).unwrap();
            let got = root.path(&[(SOAP, "Body"), (MESSAGES, "Unsubscribe"), (MESSAGES, "SubscriptionId")]).unwrap();
            prop_assert_eq!(&got.text, &sub);

            let root = parse(get_item(&header(), &[&item], &ItemShape::full_message_with_mime()).as_bytes()).unwrap();
            let id = root.path(&[(SOAP, "Body"), (MESSAGES, "GetItem"), (MESSAGES, "ItemIds"), (TYPES, "ItemId")]).unwrap();
            prop_assert_eq!(id.attr("Id"), Some(item.as_str()));
        }
    }

    #[test]
    fn find_folders_asks_every_level_below_the_root_a_page_at_a_time() {
        let xml = find_folders(&header(), &FolderRef::message_root(None), 500, 5000);
        let root = parse(xml.as_bytes()).unwrap();
        let find = root
            .path(&[(SOAP, "Body"), (MESSAGES, "FindFolder")])
            .unwrap();
        assert_eq!(find.attr("Traversal"), Some("Deep"));
        let order: Vec<&str> = find.children.iter().map(|c| c.local.as_str()).collect();
        // The schema's order.
        assert_eq!(
            order,
            ["FolderShape", "IndexedPageFolderView", "ParentFolderIds"]
        );
        let fields: Vec<&str> = find
            .path(&[(MESSAGES, "FolderShape"), (TYPES, "AdditionalProperties")])
            .unwrap()
            .children
            .iter()
            .filter_map(|f| f.attr("FieldURI"))
            .collect();
        assert_eq!(
            fields,
            [
                "folder:ParentFolderId",
                "folder:DisplayName",
                "folder:FolderClass"
            ]
        );
        let view = find.child(MESSAGES, "IndexedPageFolderView").unwrap();
        assert_eq!(view.attr("Offset"), Some("500"));
        assert_eq!(view.attr("MaxEntriesReturned"), Some("1000"));
        let parent = find
            .path(&[
                (MESSAGES, "ParentFolderIds"),
                (TYPES, "DistinguishedFolderId"),
            ])
            .unwrap();
        assert_eq!(parent.attr("Id"), Some("msgfolderroot"));
    }

    #[test]
    fn find_by_message_id_restricts_to_the_escaped_message_id() {
        let xml = find_by_message_id(&header(), &FolderRef::inbox(None), r#"<a"b&c@example.com>"#);
        let root = parse(xml.as_bytes()).unwrap();
        let find = root
            .path(&[(SOAP, "Body"), (MESSAGES, "FindItem")])
            .unwrap();
        let order: Vec<&str> = find.children.iter().map(|c| c.local.as_str()).collect();
        // The schema's order.
        assert_eq!(
            order,
            [
                "ItemShape",
                "IndexedPageItemView",
                "Restriction",
                "ParentFolderIds"
            ]
        );
        let equal = find
            .path(&[(MESSAGES, "Restriction"), (TYPES, "IsEqualTo")])
            .unwrap();
        assert_eq!(
            equal.child(TYPES, "FieldURI").unwrap().attr("FieldURI"),
            Some("message:InternetMessageId")
        );
        let constant = equal
            .path(&[(TYPES, "FieldURIOrConstant"), (TYPES, "Constant")])
            .unwrap();
        assert_eq!(constant.attr("Value"), Some(r#"<a"b&c@example.com>"#));
    }
}
