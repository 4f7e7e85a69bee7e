//! The mock's own reading of SOAP requests (roxmltree) and writing of SOAP responses (string
//! templates). It deliberately shares no XML code with the `ews` crate, so a bug in one side's
//! reading or writing cannot be hidden by the same bug on the other; golden fixtures pin both.

use std::collections::HashSet;
use std::fmt::Write as _;

use base64::Engine as _;
use roxmltree::{Document, Node};

use crate::clock;
use crate::folders::folder_id;
use crate::mail::Item;
use crate::state::{self, Target};

const SOAP: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const TYPES: &str = "http://schemas.microsoft.com/exchange/services/2006/types";
const MESSAGES: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";

/// What a GetItem asked to see.
#[derive(Debug, Clone, Default)]
pub(crate) struct Shape {
    pub base: String,
    pub mime: bool,
    pub fields: HashSet<String>,
}

impl Shape {
    fn wants(&self, field: &str) -> bool {
        match self.base.as_str() {
            "AllProperties" => true,
            "Default" => {
                matches!(
                    field,
                    "item:Subject"
                        | "item:DateTimeReceived"
                        | "message:Sender"
                        | "message:From"
                        | "message:ToRecipients"
                        | "message:CcRecipients"
                        | "item:Body"
                ) || self.fields.contains(field)
            }
            _ => self.fields.contains(field),
        }
    }
}

/// A decoded request.
#[derive(Debug)]
pub(crate) enum Operation {
    Subscribe {
        streaming: bool,
        mailbox: Option<String>,
        /// The folders named (distinguished ids or folder ids); every folder when `None`
        /// (`SubscribeToAllFolders`).
        folders: Option<Vec<String>>,
        event_types: Vec<String>,
    },
    GetStreamingEvents {
        ids: Vec<String>,
        timeout_minutes: u64,
    },
    GetItem {
        ids: Vec<String>,
        shape: Shape,
    },
    Unsubscribe {
        id: String,
    },
    GetFolder {
        folders: Vec<(String, Option<String>)>,
    },
    FindItem {
        folder: (String, Option<String>),
        shape: Shape,
        offset: usize,
        max_entries: usize,
        query: ItemQuery,
    },
    FindFolder {
        folder: (String, Option<String>),
        /// Every level below (`Deep`), or the children only.
        deep: bool,
        offset: usize,
        max_entries: usize,
    },
    /// Answered only so that a client probing the server version gets a well-formed reply.
    ConvertId {
        ids: usize,
    },
    SyncFolderItems {
        /// The distinguished id or folder id, and the mailbox named with it.
        folder: (String, Option<String>),
        state: Option<String>,
        max_changes: usize,
    },
    /// `CreateItem` of one message to send.
    CreateItem {
        /// `SendAndSaveCopy`, `SendOnly` (the two served) or `SaveOnly`.
        disposition: String,
        message: Outgoing,
    },
    /// An operation this server does not implement, by name.
    Unsupported(String),
}

/// A message a client asked to send.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outgoing {
    pub mail: crate::mail::NewMail,
    pub bcc: Vec<String>,
}

impl Operation {
    pub fn name(&self) -> &str {
        match self {
            Operation::Subscribe { .. } => "Subscribe",
            Operation::GetStreamingEvents { .. } => "GetStreamingEvents",
            Operation::GetItem { .. } => "GetItem",
            Operation::Unsubscribe { .. } => "Unsubscribe",
            Operation::GetFolder { .. } => "GetFolder",
            Operation::SyncFolderItems { .. } => "SyncFolderItems",
            Operation::FindItem { .. } => "FindItem",
            Operation::FindFolder { .. } => "FindFolder",
            Operation::ConvertId { .. } => "ConvertId",
            Operation::CreateItem { .. } => "CreateItem",
            Operation::Unsupported(name) => name,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Request {
    pub operation: Operation,
    /// The SMTP address in `ExchangeImpersonation`, if any.
    pub impersonate: Option<String>,
    /// The `Version` of `RequestServerVersion`, if the request says.
    pub version: Option<String>,
}

fn child<'a, 'i>(node: Node<'a, 'i>, ns: &str, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace() == Some(ns)
    })
}

/// Children by local name only: where deployed clients disagree on the namespace.
fn child_local<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn elements<'a, 'i>(node: Node<'a, 'i>, name: &'a str) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn text(node: Node<'_, '_>) -> String {
    node.text().unwrap_or("").trim().to_owned()
}

fn mailbox_of(folder: Node<'_, '_>) -> Option<String> {
    child(folder, TYPES, "Mailbox")
        .and_then(|m| child(m, TYPES, "EmailAddress"))
        .map(text)
}

/// The `m:ItemShape` of a GetItem or FindItem.
fn item_shape(op: Node<'_, '_>) -> Result<Shape, String> {
    let node = child(op, MESSAGES, "ItemShape")
        .ok_or_else(|| format!("{} without ItemShape", op.tag_name().name()))?;
    Ok(Shape {
        base: child(node, TYPES, "BaseShape")
            .map(text)
            .unwrap_or_default(),
        mime: child(node, TYPES, "IncludeMimeContent").is_some_and(|n| text(n) == "true"),
        fields: child(node, TYPES, "AdditionalProperties")
            .map(|a| {
                elements(a, "FieldURI")
                    .filter_map(|f| f.attribute("FieldURI").map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The first folder id element under `container` (distinguished or not) and its mailbox.
fn folder_ref(container: Option<Node<'_, '_>>) -> Option<(String, Option<String>)> {
    let folder = container?.children().find(Node::is_element)?;
    Some((folder.attribute("Id")?.to_owned(), mailbox_of(folder)))
}

/// Which items a FindItem lists, and in which order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ItemQuery {
    /// `IsEqualTo` on `message:InternetMessageId`.
    pub message_id: Option<String>,
    /// `IsGreaterThanOrEqualTo` on `item:DateTimeReceived`, in seconds since the Unix epoch.
    pub received_since: Option<i64>,
    /// `SortOrder` ascending on `item:DateTimeReceived`; newest first otherwise.
    pub oldest_first: bool,
}

/// A FindItem's restriction and sort order: no restriction, `IsEqualTo` on
/// `message:InternetMessageId`, or `IsGreaterThanOrEqualTo` on `item:DateTimeReceived`, each
/// with a constant (the ones this server serves; any other is refused as Exchange refuses what
/// it cannot read); sorted by received time.
fn item_query(op: Node<'_, '_>) -> Result<ItemQuery, String> {
    let mut query = ItemQuery::default();
    if let Some(order) = child(op, MESSAGES, "SortOrder") {
        let field = child(order, TYPES, "FieldOrder").ok_or("SortOrder without FieldOrder")?;
        let uri = child(field, TYPES, "FieldURI").and_then(|f| f.attribute("FieldURI"));
        if uri != Some("item:DateTimeReceived") {
            return Err("only item:DateTimeReceived is served in a SortOrder".into());
        }
        query.oldest_first = field.attribute("Order") == Some("Ascending");
    }
    let Some(r) = child(op, MESSAGES, "Restriction") else {
        return Ok(query);
    };
    let test = r
        .children()
        .find(Node::is_element)
        .ok_or("an empty Restriction")?;
    let field = child(test, TYPES, "FieldURI").and_then(|f| f.attribute("FieldURI"));
    let value = child(test, TYPES, "FieldURIOrConstant")
        .and_then(|c| child(c, TYPES, "Constant"))
        .and_then(|c| c.attribute("Value"))
        .ok_or("a restriction without a Constant")?;
    match (test.tag_name().name(), field) {
        ("IsEqualTo", Some("message:InternetMessageId")) => {
            query.message_id = Some(value.to_owned());
        }
        ("IsGreaterThanOrEqualTo", Some("item:DateTimeReceived")) => {
            query.received_since = Some(
                clock::parse_xs_datetime(value)
                    .ok_or("the DateTimeReceived constant is not an xs:dateTime")?,
            );
        }
        _ => {
            return Err(
                "only IsEqualTo on message:InternetMessageId and IsGreaterThanOrEqualTo on item:DateTimeReceived are served in a restriction"
                    .into(),
            );
        }
    }
    Ok(query)
}

/// The children `t:Message` may have on create, in the schema's order (`ItemType`'s, then
/// `MessageType`'s; those this server reads and those it ignores): Exchange refuses a request
/// whose elements are out of order.
const MESSAGE_ORDER: [&str; 43] = [
    "MimeContent",
    "ItemClass",
    "Subject",
    "Sensitivity",
    "Body",
    "Attachments",
    "Categories",
    "Importance",
    "InReplyTo",
    "InternetMessageHeaders",
    "ReminderDueBy",
    "ReminderIsSet",
    "ReminderNextTime",
    "ReminderMinutesBeforeStart",
    "ExtendedProperty",
    "Culture",
    "Flag",
    "PolicyTag",
    "ArchiveTag",
    "RetentionDate",
    "IsClutter",
    "Sender",
    "ToRecipients",
    "CcRecipients",
    "BccRecipients",
    "IsReadReceiptRequested",
    "IsDeliveryReceiptRequested",
    "ConversationIndex",
    "ConversationTopic",
    "From",
    "InternetMessageId",
    "IsRead",
    "IsResponseRequested",
    "References",
    "ReplyTo",
    "ReceivedBy",
    "ReceivedRepresenting",
    "ApprovalRequestData",
    "VotingInformation",
    "ReminderMessageData",
    "MessageSafety",
    "SenderSMTPAddress",
    "MailboxGuids",
];

/// The SMTP addresses of a recipient list (`t:ToRecipients/t:Mailbox/t:EmailAddress`).
fn addresses(message: Node<'_, '_>, list: &str) -> Vec<String> {
    child(message, TYPES, list)
        .map(|l| {
            elements(l, "Mailbox")
                .filter_map(|m| child(m, TYPES, "EmailAddress").map(text))
                .collect()
        })
        .unwrap_or_default()
}

/// A `t:Message` to send, checked against the schema's order.
fn outgoing(message: Node<'_, '_>) -> Result<Outgoing, String> {
    let mut at = 0;
    for el in message.children().filter(Node::is_element) {
        let name = el.tag_name().name();
        let pos = MESSAGE_ORDER
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| format!("t:Message has an element this server does not read: {name}"))?;
        if pos < at {
            return Err(format!(
                "t:Message's {name} comes after {}, against the schema's order",
                MESSAGE_ORDER[at]
            ));
        }
        at = pos;
    }
    let value = |name| {
        child(message, TYPES, name)
            .map(text)
            .filter(|v| !v.is_empty())
    };
    let body = child(message, TYPES, "Body");
    let body_text = body
        .map(|b| b.text().unwrap_or("").to_owned())
        .unwrap_or_default();
    let html = body.and_then(|b| b.attribute("BodyType")) == Some("HTML");
    let mut attachments = Vec::new();
    if let Some(list) = child(message, TYPES, "Attachments") {
        for file in list.children().filter(Node::is_element) {
            if file.tag_name().name() != "FileAttachment" {
                return Err("only t:FileAttachment is served in Attachments".into());
            }
            let content = child(file, TYPES, "Content")
                .map(text)
                .ok_or("FileAttachment without Content")?;
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &content)
                .map_err(|_| "FileAttachment's Content is not base64")?;
            attachments.push(crate::mail::Attachment {
                name: child(file, TYPES, "Name").map(text).unwrap_or_default(),
                content_type: child(file, TYPES, "ContentType")
                    .map(text)
                    .unwrap_or_else(|| "application/octet-stream".into()),
                content_base64: content,
                content_id: child(file, TYPES, "ContentId").map(text),
            });
        }
    }
    Ok(Outgoing {
        mail: crate::mail::NewMail {
            subject: value("Subject").unwrap_or_default(),
            body: if html {
                String::new()
            } else {
                body_text.clone()
            },
            html: html.then_some(body_text),
            attachments,
            to: addresses(message, "ToRecipients"),
            cc: addresses(message, "CcRecipients"),
            message_id: value("InternetMessageId"),
            in_reply_to: value("InReplyTo"),
            references: value("References"),
            importance: value("Importance").map(|i| i.to_ascii_lowercase()),
            ..Default::default()
        },
        bcc: addresses(message, "BccRecipients"),
    })
}

/// A number of a paged view (`Offset`, `MaxEntriesReturned`), `default` when absent.
fn paging(
    view: Option<Node<'_, '_>>,
    kind: &str,
    name: &str,
    default: usize,
) -> Result<usize, String> {
    match view.and_then(|v| v.attribute(name)) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{kind} {name} is not an integer")),
    }
}

/// Decodes a request envelope; the error says what is wrong, for a schema-validation fault.
pub(crate) fn parse_request(body: &str) -> Result<Request, String> {
    let doc = Document::parse(body).map_err(|e| format!("not well-formed XML: {e}"))?;
    let env = doc.root_element();
    if env.tag_name().name() != "Envelope" || env.tag_name().namespace() != Some(SOAP) {
        return Err("the root element is not a SOAP 1.1 Envelope".into());
    }
    let impersonate = child(env, SOAP, "Header")
        .and_then(|h| child(h, TYPES, "ExchangeImpersonation"))
        .and_then(|i| child(i, TYPES, "ConnectingSID"))
        .and_then(|sid| {
            child_local(sid, "PrimarySmtpAddress").or_else(|| child_local(sid, "SmtpAddress"))
        })
        .map(text);
    let version = child(env, SOAP, "Header")
        .and_then(|h| child(h, TYPES, "RequestServerVersion"))
        .and_then(|v| v.attribute("Version"))
        .map(str::to_owned);
    let op = child(env, SOAP, "Body")
        .and_then(|b| b.children().find(Node::is_element))
        .ok_or("the SOAP Body holds no operation")?;
    let operation = match op.tag_name().name() {
        "Subscribe" => {
            let streaming = child(op, MESSAGES, "StreamingSubscriptionRequest");
            let req = streaming
                .or_else(|| child(op, MESSAGES, "PullSubscriptionRequest"))
                .or_else(|| child(op, MESSAGES, "PushSubscriptionRequest"))
                .ok_or("Subscribe without a subscription request")?;
            let named: Vec<Node<'_, '_>> = child(req, TYPES, "FolderIds")
                .map(|f| f.children().filter(Node::is_element).collect())
                .unwrap_or_default();
            let mailbox = named.first().copied().and_then(mailbox_of);
            let all = req.attribute("SubscribeToAllFolders") == Some("true");
            if !all && named.is_empty() {
                return Err("Subscribe names no folder".into());
            }
            let folders = (!all).then(|| {
                named
                    .iter()
                    .filter_map(|f| f.attribute("Id").map(str::to_owned))
                    .collect()
            });
            let event_types = child(req, TYPES, "EventTypes")
                .map(|e| elements(e, "EventType").map(text).collect())
                .unwrap_or_default();
            Operation::Subscribe {
                streaming: streaming.is_some(),
                mailbox,
                folders,
                event_types,
            }
        }
        "GetStreamingEvents" => {
            let ids = child(op, MESSAGES, "SubscriptionIds")
                .map(|ids| elements(ids, "SubscriptionId").map(text).collect())
                .unwrap_or_default();
            let timeout_minutes = child(op, MESSAGES, "ConnectionTimeout")
                .map(text)
                .ok_or("GetStreamingEvents without ConnectionTimeout")?
                .parse()
                .map_err(|_| "ConnectionTimeout is not an integer")?;
            Operation::GetStreamingEvents {
                ids,
                timeout_minutes,
            }
        }
        "GetItem" => {
            let shape = item_shape(op)?;
            let ids = child(op, MESSAGES, "ItemIds")
                .map(|ids| {
                    elements(ids, "ItemId")
                        .filter_map(|i| i.attribute("Id").map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Operation::GetItem { ids, shape }
        }
        "Unsubscribe" => Operation::Unsubscribe {
            id: child(op, MESSAGES, "SubscriptionId")
                .map(text)
                .ok_or("Unsubscribe without SubscriptionId")?,
        },
        "GetFolder" => {
            let folders = child(op, MESSAGES, "FolderIds")
                .map(|ids| {
                    ids.children()
                        .filter(Node::is_element)
                        .filter_map(|f| Some((f.attribute("Id")?.to_owned(), mailbox_of(f))))
                        .collect()
                })
                .unwrap_or_default();
            Operation::GetFolder { folders }
        }
        "FindItem" => {
            let view = child(op, MESSAGES, "IndexedPageItemView");
            let number = |name, default| paging(view, "IndexedPageItemView", name, default);
            Operation::FindItem {
                folder: folder_ref(child(op, MESSAGES, "ParentFolderIds"))
                    .ok_or("FindItem without ParentFolderIds")?,
                shape: item_shape(op)?,
                offset: number("Offset", 0)?,
                max_entries: number("MaxEntriesReturned", 1000)?.clamp(1, 1000),
                query: item_query(op)?,
            }
        }
        "FindFolder" => {
            let view = child(op, MESSAGES, "IndexedPageFolderView");
            let number = |name, default| paging(view, "IndexedPageFolderView", name, default);
            Operation::FindFolder {
                folder: folder_ref(child(op, MESSAGES, "ParentFolderIds"))
                    .ok_or("FindFolder without ParentFolderIds")?,
                deep: op.attribute("Traversal") == Some("Deep"),
                offset: number("Offset", 0)?,
                max_entries: number("MaxEntriesReturned", 1000)?.clamp(1, 1000),
            }
        }
        "ConvertId" => Operation::ConvertId {
            ids: child(op, MESSAGES, "SourceIds")
                .map_or(0, |ids| ids.children().filter(Node::is_element).count()),
        },
        "SyncFolderItems" => {
            let folder = folder_ref(child(op, MESSAGES, "SyncFolderId"))
                .ok_or("SyncFolderItems without SyncFolderId")?;
            let max_changes: usize = child(op, MESSAGES, "MaxChangesReturned")
                .map(text)
                .ok_or("SyncFolderItems without MaxChangesReturned")?
                .parse()
                .map_err(|_| "MaxChangesReturned is not an integer")?;
            if !(1..=512).contains(&max_changes) {
                return Err("MaxChangesReturned must be between 1 and 512".into());
            }
            Operation::SyncFolderItems {
                folder,
                state: child(op, MESSAGES, "SyncState")
                    .map(text)
                    .filter(|s| !s.is_empty()),
                max_changes,
            }
        }
        "CreateItem" => {
            let disposition = op
                .attribute("MessageDisposition")
                .ok_or("CreateItem without MessageDisposition")?
                .to_owned();
            let items = child(op, MESSAGES, "Items").ok_or("CreateItem without Items")?;
            let mut listed = items.children().filter(Node::is_element);
            let message = listed.next().ok_or("CreateItem without an item")?;
            if listed.next().is_some() {
                return Err("CreateItem of more than one item is not served".into());
            }
            if message.tag_name().name() != "Message"
                || message.tag_name().namespace() != Some(TYPES)
            {
                return Err("CreateItem serves t:Message only".into());
            }
            Operation::CreateItem {
                disposition,
                message: outgoing(message)?,
            }
        }
        other => Operation::Unsupported(other.to_owned()),
    };
    Ok(Request {
        operation,
        impersonate,
        version,
    })
}

/// XML-escapes text and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

pub(crate) const XML_DECL: &str = r#"<?xml version="1.0" encoding="utf-8"?>"#;

/// The request versions an older server may be set to behave as, oldest first, with the
/// `ServerVersionInfo` numbers such a server reports.
pub(crate) const VERSIONS: [(&str, u32, u32, u32); 4] = [
    ("Exchange2010_SP1", 14, 1, 218),
    ("Exchange2010_SP2", 14, 2, 247),
    ("Exchange2013", 15, 0, 516),
    ("Exchange2013_SP1", 15, 0, 847),
];

/// Where a request version stands among [`VERSIONS`]; versions newer than all of them
/// (`Exchange2016`) rank above.
pub(crate) fn version_rank(name: &str) -> Option<usize> {
    VERSIONS
        .iter()
        .position(|(n, ..)| n.eq_ignore_ascii_case(name))
        .or_else(|| {
            name.eq_ignore_ascii_case("Exchange2016")
                .then_some(VERSIONS.len())
        })
}

/// The `ServerVersionInfo` header element of an older server; Exchange 2010 names its version,
/// later servers a schema date.
pub(crate) fn server_version_info(name: &str) -> String {
    let (name, major, minor, build) = VERSIONS
        .iter()
        .find(|(n, ..)| n.eq_ignore_ascii_case(name))
        .copied()
        .unwrap_or(("Exchange2013_SP1", 15, 0, 847));
    let version = if major == 14 { name } else { "V2_10" };
    format!(
        r#"<h:ServerVersionInfo xmlns:h="{TYPES}" MajorVersion="{major}" MinorVersion="{minor}" MajorBuildNumber="{build}" MinorBuildNumber="0" Version="{version}"/>"#
    )
}

/// What mock-ews reports of itself unless told to be older: Exchange 2016.
const CURRENT_VERSION_INFO: &str = concat!(
    r#"<h:ServerVersionInfo xmlns:h="http://schemas.microsoft.com/exchange/services/2006/types" "#,
    r#"MajorVersion="15" MinorVersion="1" MajorBuildNumber="2507" MinorBuildNumber="6" Version="V2017_07_11"/>"#
);

/// Puts an older server's `ServerVersionInfo` in place of the current one in a whole answer.
pub(crate) fn as_version(answer: &str, name: &str) -> String {
    answer.replacen(CURRENT_VERSION_INFO, &server_version_info(name), 1)
}

/// A whole envelope: a Header with ServerVersionInfo (strict clients require it) around `body`.
/// It starts `<s:Envelope ` with a space, which exchangelib's splitter needs.
pub(crate) fn envelope(body: &str) -> String {
    format!(
        r#"<s:Envelope xmlns:s="{SOAP}"><s:Header>{CURRENT_VERSION_INFO}</s:Header><s:Body>{body}</s:Body></s:Envelope>"#
    )
}

/// `<m:{op}Response>` around the given response messages.
pub(crate) fn response(op: &str, messages: &str) -> String {
    envelope(&format!(
        r#"<m:{op}Response xmlns:m="{MESSAGES}" xmlns:t="{TYPES}"><m:ResponseMessages>{messages}</m:ResponseMessages></m:{op}Response>"#
    ))
}

pub(crate) fn success(op: &str, inner: &str) -> String {
    format!(
        r#"<m:{op}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>{inner}</m:{op}ResponseMessage>"#
    )
}

/// An error message, children in the order strict clients read them.
pub(crate) fn error(op: &str, code: &str, text: &str, inner: &str) -> String {
    format!(
        concat!(
            r#"<m:{op}ResponseMessage ResponseClass="Error"><m:MessageText>{text}</m:MessageText>"#,
            r#"<m:ResponseCode>{code}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>{inner}</m:{op}ResponseMessage>"#
        ),
        op = op,
        text = esc(text),
        code = code,
        inner = inner
    )
}

/// `ErrorInvalidServerVersion`, as an older server answers a request claiming a newer
/// version: a fault whose header says which version the server is.
pub(crate) fn invalid_server_version(server: &str) -> String {
    fault(
        "ErrorInvalidServerVersion",
        "The specified server version is invalid.",
        None,
    )
    .replacen(
        "<s:Body>",
        &format!(
            "<s:Header>{}</s:Header><s:Body>",
            server_version_info(server)
        ),
        1,
    )
}

/// A SOAP fault (sent with HTTP 500).
pub(crate) fn fault(code: &str, text: &str, back_off_ms: Option<u64>) -> String {
    let message_xml = back_off_ms
        .map(|ms| {
            format!(
                r#"<t:MessageXml xmlns:t="{TYPES}"><t:Value Name="BackOffMilliseconds">{ms}</t:Value></t:MessageXml>"#
            )
        })
        .unwrap_or_default();
    let errors = "http://schemas.microsoft.com/exchange/services/2006/errors";
    format!(
        concat!(
            r#"<s:Envelope xmlns:s="{soap}"><s:Body><s:Fault>"#,
            r#"<faultcode xmlns:a="{types}">a:{code}</faultcode><faultstring xml:lang="en-US">{text}</faultstring>"#,
            r#"<detail><e:ResponseCode xmlns:e="{errors}">{code}</e:ResponseCode><e:Message xmlns:e="{errors}">{text}</e:Message>{mx}</detail>"#,
            r#"</s:Fault></s:Body></s:Envelope>"#
        ),
        soap = SOAP,
        types = TYPES,
        errors = errors,
        code = code,
        text = esc(text),
        mx = message_xml
    )
}

/// A streaming message with only a connection status.
pub(crate) fn stream_status(closed: bool) -> String {
    let status = if closed { "Closed" } else { "OK" };
    response(
        "GetStreamingEvents",
        &success(
            "GetStreamingEvents",
            &format!("<m:ConnectionStatus>{status}</m:ConnectionStatus>"),
        ),
    )
}

/// `m:ErrorSubscriptionIds` naming these subscriptions.
pub(crate) fn error_subscription_ids(ids: &[String]) -> String {
    let mut out = String::from("<m:ErrorSubscriptionIds>");
    for id in ids {
        let _ = write!(out, "<m:SubscriptionId>{}</m:SubscriptionId>", esc(id));
    }
    out.push_str("</m:ErrorSubscriptionIds>");
    out
}

/// A streaming error for some subscriptions, closing the connection.
pub(crate) fn stream_error(code: &str, text: &str, ids: &[String]) -> String {
    let inner = format!(
        "{}<m:ConnectionStatus>Closed</m:ConnectionStatus>",
        error_subscription_ids(ids)
    );
    response(
        "GetStreamingEvents",
        &error("GetStreamingEvents", code, text, &inner),
    )
}

/// A streaming message carrying events, never together with a ConnectionStatus.
pub(crate) fn stream_notifications(batches: &[state::Drained]) -> String {
    let mut inner = String::from("<m:Notifications>");
    for (sub, mailbox, events) in batches {
        let _ = write!(
            inner,
            "<m:Notification><t:SubscriptionId>{}</t:SubscriptionId>",
            esc(sub)
        );
        for ev in events {
            let _ = write!(
                inner,
                "<t:{}><t:TimeStamp>{}</t:TimeStamp>",
                ev.kind,
                clock::xs_datetime(ev.timestamp)
            );
            match &ev.target {
                Target::Item {
                    id,
                    change_key,
                    folder,
                } => {
                    let _ = write!(
                        inner,
                        r#"<t:ItemId Id="{}" ChangeKey="{}"/><t:ParentFolderId Id="{}" ChangeKey="AQAAAA=="/>"#,
                        esc(id),
                        esc(change_key),
                        esc(&folder_id(mailbox, Some(folder)))
                    );
                }
                Target::Folder { name, unread } => {
                    let parent = crate::folders::by_name(name).and_then(|f| f.3);
                    let _ = write!(
                        inner,
                        r#"<t:FolderId Id="{}" ChangeKey="AQAAAA=="/><t:ParentFolderId Id="{}" ChangeKey="AQAAAA=="/><t:UnreadCount>{unread}</t:UnreadCount>"#,
                        esc(&folder_id(mailbox, Some(name))),
                        esc(&folder_id(mailbox, parent))
                    );
                }
            }
            let _ = write!(inner, "</t:{}>", ev.kind);
        }
        inner.push_str("</m:Notification>");
    }
    inner.push_str("</m:Notifications>");
    response("GetStreamingEvents", &success("GetStreamingEvents", &inner))
}

/// The body of a SyncFolderItems success message.
pub(crate) fn sync_page(page: &state::SyncPage) -> String {
    let mut out = format!(
        "<m:SyncState>{}</m:SyncState><m:IncludesLastItemInRange>{}</m:IncludesLastItemInRange><m:Changes>",
        esc(&page.state),
        page.includes_last
    );
    for change in &page.changes {
        match change {
            state::Change::Create { id, change_key } => {
                let _ = write!(
                    out,
                    r#"<t:Create><t:Message><t:ItemId Id="{}" ChangeKey="{}"/></t:Message></t:Create>"#,
                    esc(id),
                    esc(change_key)
                );
            }
        }
    }
    out.push_str("</m:Changes>");
    out
}

fn mailbox_xml(name: Option<&str>, email: &str) -> String {
    let name = name
        .map(|n| format!("<t:Name>{}</t:Name>", esc(n)))
        .unwrap_or_default();
    format!(
        "<t:Mailbox>{name}<t:EmailAddress>{}</t:EmailAddress><t:RoutingType>SMTP</t:RoutingType></t:Mailbox>",
        esc(email)
    )
}

/// One `t:Message`, with its elements in schema order, limited to what the shape asks for.
pub(crate) fn message(mailbox: &str, item: &Item, shape: &Shape) -> String {
    let mut out = String::from("<t:Message>");
    if shape.mime || shape.fields.contains("item:MimeContent") {
        let _ = write!(
            out,
            r#"<t:MimeContent CharacterSet="UTF-8">{}</t:MimeContent>"#,
            base64::engine::general_purpose::STANDARD.encode(&item.mime)
        );
    }
    let _ = write!(
        out,
        r#"<t:ItemId Id="{}" ChangeKey="{}"/>"#,
        esc(&item.id),
        esc(&item.change_key)
    );
    if shape.wants("item:ParentFolderId") {
        let _ = write!(
            out,
            r#"<t:ParentFolderId Id="{}" ChangeKey="AQAAAA=="/>"#,
            esc(&folder_id(mailbox, Some(item.folder)))
        );
    }
    if shape.wants("item:ItemClass") {
        out.push_str("<t:ItemClass>IPM.Note</t:ItemClass>");
    }
    if shape.wants("item:Subject") {
        let _ = write!(out, "<t:Subject>{}</t:Subject>", esc(&item.mail.subject));
    }
    if shape.wants("item:Body") {
        // Exchange serves the HTML body when the message has one.
        let (kind, body) = match &item.mail.html {
            Some(html) => ("HTML", html),
            None => ("Text", &item.mail.body),
        };
        let _ = write!(out, r#"<t:Body BodyType="{kind}">{}</t:Body>"#, esc(body));
    }
    if shape.wants("item:DateTimeReceived") {
        let _ = write!(
            out,
            "<t:DateTimeReceived>{}</t:DateTimeReceived>",
            clock::xs_datetime(item.received)
        );
    }
    if shape.wants("item:Size") {
        let _ = write!(out, "<t:Size>{}</t:Size>", item.mime.len());
    }
    if shape.wants("item:Importance") {
        out.push_str("<t:Importance>Normal</t:Importance>");
    }
    if shape.wants("item:DateTimeSent") {
        let _ = write!(
            out,
            "<t:DateTimeSent>{}</t:DateTimeSent>",
            clock::xs_datetime(item.received)
        );
    }
    if shape.wants("message:Sender") {
        let _ = write!(
            out,
            "<t:Sender>{}</t:Sender>",
            mailbox_xml(item.mail.from_name.as_deref(), &item.mail.from)
        );
    }
    for (field, element, list) in [
        ("message:ToRecipients", "ToRecipients", &item.mail.to),
        ("message:CcRecipients", "CcRecipients", &item.mail.cc),
    ] {
        if shape.wants(field) && !list.is_empty() {
            let _ = write!(out, "<t:{element}>");
            for address in list {
                out.push_str(&mailbox_xml(None, address));
            }
            let _ = write!(out, "</t:{element}>");
        }
    }
    if shape.wants("message:From") {
        let _ = write!(
            out,
            "<t:From>{}</t:From>",
            mailbox_xml(item.mail.from_name.as_deref(), &item.mail.from)
        );
    }
    if shape.wants("message:InternetMessageId") {
        let _ = write!(
            out,
            "<t:InternetMessageId>{}</t:InternetMessageId>",
            esc(&item.message_id)
        );
    }
    out.push_str("</t:Message>");
    out
}
