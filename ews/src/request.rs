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

/// A well-known folder, optionally in another mailbox than the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistinguishedFolder {
    /// `inbox`, `root`, `sentitems`, ...
    pub id: String,
    pub mailbox: Option<String>,
}

impl DistinguishedFolder {
    pub fn inbox(mailbox: Option<&str>) -> Self {
        DistinguishedFolder {
            id: "inbox".into(),
            mailbox: mailbox.map(str::to_owned),
        }
    }

    /// The top of the mailbox's folders that hold mail, calendars, contacts and tasks (the
    /// "Top of Information Store").
    pub fn message_root(mailbox: Option<&str>) -> Self {
        DistinguishedFolder {
            id: "msgfolderroot".into(),
            mailbox: mailbox.map(str::to_owned),
        }
    }

    fn write(&self, out: &mut String) {
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

/// `Subscribe` with a `StreamingSubscriptionRequest` on one folder.
pub fn subscribe_streaming(
    header: &RequestHeader,
    folder: &DistinguishedFolder,
    events: &[EventType],
) -> String {
    envelope(header, |out| {
        out.push_str("<m:Subscribe><m:StreamingSubscriptionRequest><t:FolderIds>");
        folder.write(out);
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
    folder: &DistinguishedFolder,
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

/// `FindItem` on a folder, newest first by received time: one page of item ids with their
/// received times, from `offset`. For finding what arrived since a moment, when no sync state
/// can say it.
pub fn find_recent_items(
    header: &RequestHeader,
    folder: &DistinguishedFolder,
    offset: u32,
    max_entries: u16,
) -> String {
    envelope(header, |out| {
        out.push_str(concat!(
            r#"<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>"#,
            r#"<t:AdditionalProperties><t:FieldURI FieldURI="item:DateTimeReceived"/></t:AdditionalProperties>"#,
            "</m:ItemShape>"
        ));
        let _ = write!(
            out,
            r#"<m:IndexedPageItemView MaxEntriesReturned="{}" Offset="{offset}" BasePoint="Beginning"/>"#,
            max_entries.clamp(1, MAX_FIND_ENTRIES)
        );
        out.push_str(concat!(
            r#"<m:SortOrder><t:FieldOrder Order="Descending"><t:FieldURI FieldURI="item:DateTimeReceived"/></t:FieldOrder></m:SortOrder>"#,
            "<m:ParentFolderIds>"
        ));
        folder.write(out);
        out.push_str("</m:ParentFolderIds></m:FindItem>");
    })
}

/// `FindItem` on a folder for the items whose `Message-ID` is `message_id` (the
/// `InternetMessageId` Creatio knows a mail by): their ids, newest first.
pub fn find_by_message_id(
    header: &RequestHeader,
    folder: &DistinguishedFolder,
    message_id: &str,
) -> String {
    envelope(header, |out| {
        out.push_str(concat!(
            r#"<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape>"#,
            r#"<m:IndexedPageItemView MaxEntriesReturned="10" Offset="0" BasePoint="Beginning"/>"#,
            r#"<m:Restriction><t:IsEqualTo><t:FieldURI FieldURI="message:InternetMessageId"/>"#,
        ));
        let _ = write!(
            out,
            r#"<t:FieldURIOrConstant><t:Constant Value="{}"/></t:FieldURIOrConstant>"#,
            escape(message_id)
        );
        out.push_str("</t:IsEqualTo></m:Restriction><m:ParentFolderIds>");
        folder.write(out);
        out.push_str("</m:ParentFolderIds></m:FindItem>");
    })
}

/// The most items one FindItem page may ask for.
pub const MAX_FIND_ENTRIES: u16 = 1000;

/// `FindFolder` below a folder, every level deep: one page of folder ids with their parent,
/// display name and class, from `offset`. For listing the folders a user may choose from.
pub fn find_folders(
    header: &RequestHeader,
    parent: &DistinguishedFolder,
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
pub fn get_folder(header: &RequestHeader, folder: &DistinguishedFolder) -> String {
    envelope(header, |out| {
        out.push_str(concat!(
            "<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape>",
            "<t:AdditionalProperties>",
            r#"<t:FieldURI FieldURI="folder:DisplayName"/>"#,
            r#"<t:FieldURI FieldURI="folder:TotalCount"/>"#,
            "</t:AdditionalProperties></m:FolderShape><m:FolderIds>"
        ));
        folder.write(out);
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

    #[test]
    fn find_recent_items_asks_newest_first_with_received_times() {
        let xml = find_recent_items(&header(), &DistinguishedFolder::inbox(None), 200, 5000);
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
    fn subscribe_has_the_reference_shape() {
        let xml = subscribe_streaming(
            &header(),
            &DistinguishedFolder::inbox(Some("alice@contoso.example")),
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
        let xml = sync_folder_items(
            &header(),
            &DistinguishedFolder::inbox(None),
            Some("H4sI&"),
            9999,
        );
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
        let fresh = sync_folder_items(&header(), &DistinguishedFolder::inbox(None), None, 10);
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
        let xml = find_folders(
            &header(),
            &DistinguishedFolder::message_root(None),
            500,
            5000,
        );
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
        let xml = find_by_message_id(
            &header(),
            &DistinguishedFolder::inbox(None),
            r#"<a"b&c@example.com>"#,
        );
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
