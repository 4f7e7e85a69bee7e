//! Typed values decoded from EWS response envelopes.
//!
//! Every `parse_*` function takes the raw body of an HTTP response, whatever its status: a SOAP
//! fault (HTTP 500) decodes to [`EwsError::Fault`], a response message of class `Error` to
//! [`EwsError::Response`] (or to a per-item `Err` where the operation answers per item).

use std::time::Duration;

use base64::Engine as _;

use crate::error::{EwsError, Fault, ResponseError};
use crate::ns::{MESSAGES, SOAP, TYPES};
use crate::request::ServerVersion;
use crate::xml::{Element, parse};

/// An item's id and change key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItemId {
    pub id: String,
    pub change_key: Option<String>,
}

/// A mailbox as EWS names one: display name and SMTP address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mailbox {
    pub name: Option<String>,
    pub email: Option<String>,
}

/// A fetched message with the properties the listener asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub item_id: Option<ItemId>,
    pub subject: Option<String>,
    pub body: Option<String>,
    /// True when `t:Body/@BodyType` is `HTML`.
    pub body_is_html: bool,
    pub date_time_received: Option<String>,
    pub date_time_sent: Option<String>,
    pub importance: Option<String>,
    pub sender: Option<Mailbox>,
    pub from: Option<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    /// The RFC 5322 Message-ID.
    pub internet_message_id: Option<String>,
    /// The decoded RFC 5322 message, when MIME content was asked for.
    pub mime_content: Option<Vec<u8>>,
}

/// A folder as `GetFolder` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    pub folder_id: Option<String>,
    pub display_name: Option<String>,
    pub total_count: Option<u64>,
}

/// `m:ConnectionStatus` on a streaming connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionStatus {
    Ok,
    Closed,
}

/// The kind of a notification event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    NewMail,
    Created,
    Deleted,
    Modified,
    Moved,
    Copied,
    FreeBusyChanged,
    Status,
    Other(String),
}

/// What an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventTarget {
    Item(ItemId),
    Folder(String),
}

/// One event inside a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub timestamp: Option<String>,
    pub target: Option<EventTarget>,
    pub parent_folder_id: Option<String>,
}

impl Event {
    /// The item this event announces as newly arrived, if it announces one.
    pub fn new_item(&self) -> Option<&ItemId> {
        match (&self.kind, &self.target) {
            (EventKind::NewMail | EventKind::Created, Some(EventTarget::Item(id))) => Some(id),
            _ => None,
        }
    }
}

/// The events of one subscription within a streaming message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub subscription_id: String,
    pub events: Vec<Event>,
}

/// An error a streaming message reports, for some subscriptions or (with no ids) for all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionError {
    pub error: ResponseError,
    pub subscription_ids: Vec<String>,
}

/// Everything one streaming envelope says, across all of its response messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamBatch {
    pub notifications: Vec<Notification>,
    pub errors: Vec<SubscriptionError>,
    /// The last `ConnectionStatus` seen, if any.
    pub status: Option<ConnectionStatus>,
}

impl StreamBatch {
    /// True when the server ends the connection with this message.
    pub fn closed(&self) -> bool {
        self.status == Some(ConnectionStatus::Closed)
    }
}

/// Decodes a `Subscribe` response into the new subscription's id.
pub fn parse_subscribe(bytes: &[u8]) -> Result<String, EwsError> {
    let root = parse(bytes)?;
    let msg = single_message(&root, "Subscribe")?;
    check_class(msg).map_err(EwsError::Response)?;
    msg.child(MESSAGES, "SubscriptionId")
        .map(|e| e.text.trim().to_owned())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            EwsError::Malformed("SubscribeResponseMessage without SubscriptionId".into())
        })
}

/// Decodes an `Unsubscribe` response.
pub fn parse_unsubscribe(bytes: &[u8]) -> Result<(), EwsError> {
    let root = parse(bytes)?;
    check_class(single_message(&root, "Unsubscribe")?).map_err(EwsError::Response)
}

/// Decodes a `CreateItem` response for one item; a sent message is listed without its id
/// (it left the Drafts folder), so success is all there is to read.
pub fn parse_create_item(bytes: &[u8]) -> Result<(), EwsError> {
    let root = parse(bytes)?;
    check_class(single_message(&root, "CreateItem")?).map_err(EwsError::Response)
}

/// Decodes a `GetItem` response: one result per requested id, in request order.
pub fn parse_get_item(bytes: &[u8]) -> Result<Vec<Result<Message, ResponseError>>, EwsError> {
    let root = parse(bytes)?;
    response_messages(&root, "GetItem")?
        .map(|msg| match check_class(msg) {
            Err(e) => Ok(Err(e)),
            Ok(()) => {
                let item = msg
                    .child(MESSAGES, "Items")
                    .and_then(|items| items.children.first())
                    .ok_or_else(|| {
                        EwsError::Malformed("GetItemResponseMessage without an item".into())
                    })?;
                Ok(Ok(decode_message(item)?))
            }
        })
        .collect()
}

/// Decodes a `GetFolder` response: one result per requested folder.
pub fn parse_get_folder(bytes: &[u8]) -> Result<Vec<Result<Folder, ResponseError>>, EwsError> {
    let root = parse(bytes)?;
    response_messages(&root, "GetFolder")?
        .map(|msg| match check_class(msg) {
            Err(e) => Ok(Err(e)),
            Ok(()) => {
                let folder = msg
                    .child(MESSAGES, "Folders")
                    .and_then(|f| f.children.first())
                    .ok_or_else(|| {
                        EwsError::Malformed("GetFolderResponseMessage without a folder".into())
                    })?;
                Ok(Ok(Folder {
                    folder_id: folder
                        .child(TYPES, "FolderId")
                        .and_then(|f| f.attr("Id"))
                        .map(str::to_owned),
                    display_name: folder.child_text(TYPES, "DisplayName").map(str::to_owned),
                    total_count: folder
                        .child_text(TYPES, "TotalCount")
                        .and_then(|t| t.trim().parse().ok()),
                }))
            }
        })
        .collect()
}

/// One change a `SyncFolderItems` response reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncChange {
    Create(ItemId),
    Update(ItemId),
    Delete(String),
    ReadFlagChange { id: String, is_read: bool },
}

/// A page of folder changes and the state to continue from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPage {
    pub sync_state: String,
    /// False when more changes wait: call again with `sync_state`.
    pub includes_last_item_in_range: bool,
    pub changes: Vec<SyncChange>,
}

/// Decodes a `SyncFolderItems` response.
pub fn parse_sync_folder_items(bytes: &[u8]) -> Result<SyncPage, EwsError> {
    let root = parse(bytes)?;
    let msg = single_message(&root, "SyncFolderItems")?;
    check_class(msg).map_err(EwsError::Response)?;
    let sync_state = msg
        .child_text(MESSAGES, "SyncState")
        .map(|s| s.trim().to_owned())
        .ok_or_else(|| {
            EwsError::Malformed("SyncFolderItemsResponseMessage without SyncState".into())
        })?;
    let includes_last_item_in_range = msg
        .child_text(MESSAGES, "IncludesLastItemInRange")
        .is_none_or(|t| t.trim() != "false");
    let item_of = |change: &Element| {
        change
            .children
            .iter()
            .find_map(|item| item.child(TYPES, "ItemId").and_then(item_id))
            .ok_or_else(|| {
                EwsError::Malformed(format!("{} change without an ItemId", change.local))
            })
    };
    let mut changes = Vec::new();
    for change in msg
        .child(MESSAGES, "Changes")
        .map(|c| c.children.as_slice())
        .unwrap_or_default()
    {
        if change.ns.as_deref() != Some(TYPES) {
            continue;
        }
        let id_attr = || {
            change
                .child(TYPES, "ItemId")
                .and_then(|i| i.attr("Id"))
                .map(str::to_owned)
                .ok_or_else(|| {
                    EwsError::Malformed(format!("{} change without an ItemId", change.local))
                })
        };
        changes.push(match change.local.as_str() {
            "Create" => SyncChange::Create(item_of(change)?),
            "Update" => SyncChange::Update(item_of(change)?),
            "Delete" => SyncChange::Delete(id_attr()?),
            "ReadFlagChange" => SyncChange::ReadFlagChange {
                id: id_attr()?,
                is_read: change
                    .child_text(TYPES, "IsRead")
                    .is_some_and(|t| t.trim() == "true"),
            },
            _ => continue,
        });
    }
    Ok(SyncPage {
        sync_state,
        includes_last_item_in_range,
        changes,
    })
}

/// One item a `FindItem` listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundItem {
    pub id: ItemId,
    /// `xs:dateTime`, when the server gave it.
    pub date_time_received: Option<String>,
}

/// One page of a `FindItem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FindPage {
    pub items: Vec<FoundItem>,
    /// The offset of the next page, when the server said.
    pub next_offset: Option<u32>,
    /// True when this page holds the last item of the view.
    pub includes_last_item_in_range: bool,
    /// How many items the whole view holds, when the server said.
    pub total_items_in_view: Option<u32>,
}

/// Decodes a `FindItem` response.
pub fn parse_find_item(bytes: &[u8]) -> Result<FindPage, EwsError> {
    let root = parse(bytes)?;
    let msg = single_message(&root, "FindItem")?;
    check_class(msg).map_err(EwsError::Response)?;
    let folder = msg
        .child(MESSAGES, "RootFolder")
        .ok_or_else(|| EwsError::Malformed("FindItemResponseMessage without RootFolder".into()))?;
    let items = folder
        .child(TYPES, "Items")
        .map(|items| items.children.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|item| item.ns.as_deref() == Some(TYPES))
        .map(|item| {
            let id = item
                .child(TYPES, "ItemId")
                .and_then(item_id)
                .ok_or_else(|| {
                    EwsError::Malformed(format!(
                        "FindItem listed a {} without an ItemId",
                        item.local
                    ))
                })?;
            Ok(FoundItem {
                id,
                date_time_received: item
                    .child_text(TYPES, "DateTimeReceived")
                    .map(|t| t.trim().to_owned()),
            })
        })
        .collect::<Result<Vec<_>, EwsError>>()?;
    let (next_offset, includes_last_item_in_range) = paging(folder);
    Ok(FindPage {
        items,
        next_offset,
        includes_last_item_in_range,
        total_items_in_view: folder
            .attr("TotalItemsInView")
            .and_then(|v| v.trim().parse().ok()),
    })
}

/// A paged view's `RootFolder` attributes: the offset of the next page, when the server said,
/// and whether this page holds the last entry (the last page unless it says otherwise).
fn paging(root: &Element) -> (Option<u32>, bool) {
    (
        root.attr("IndexedPagingOffset")
            .and_then(|v| v.trim().parse().ok()),
        root.attr("IncludesLastItemInRange")
            .is_none_or(|v| v.trim() != "false"),
    )
}

/// One folder a `FindFolder` listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundFolder {
    pub id: String,
    pub parent_id: Option<String>,
    pub display_name: String,
    /// `IPF.Note`, `IPF.Appointment`, ...; none for a folder that never said.
    pub folder_class: Option<String>,
}

/// One page of a `FindFolder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderPage {
    pub folders: Vec<FoundFolder>,
    /// The offset of the next page, when the server said.
    pub next_offset: Option<u32>,
    /// True when this page holds the last folder of the view.
    pub includes_last_item_in_range: bool,
}

/// Decodes a `FindFolder` response. Every kind of folder is listed (`t:Folder`,
/// `t:CalendarFolder`, `t:ContactsFolder`, `t:TasksFolder`, `t:SearchFolder`).
pub fn parse_find_folder(bytes: &[u8]) -> Result<FolderPage, EwsError> {
    let root = parse(bytes)?;
    let msg = single_message(&root, "FindFolder")?;
    check_class(msg).map_err(EwsError::Response)?;
    let found = msg.child(MESSAGES, "RootFolder").ok_or_else(|| {
        EwsError::Malformed("FindFolderResponseMessage without RootFolder".into())
    })?;
    let folders = found
        .child(TYPES, "Folders")
        .map(|f| f.children.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|f| f.ns.as_deref() == Some(TYPES))
        .map(|f| {
            let id = f
                .child(TYPES, "FolderId")
                .and_then(|i| i.attr("Id"))
                .ok_or_else(|| {
                    EwsError::Malformed(format!("FindFolder listed a {} without an id", f.local))
                })?;
            Ok(FoundFolder {
                id: id.to_owned(),
                parent_id: f
                    .child(TYPES, "ParentFolderId")
                    .and_then(|p| p.attr("Id"))
                    .map(str::to_owned),
                display_name: f
                    .child_text(TYPES, "DisplayName")
                    .unwrap_or_default()
                    .to_owned(),
                folder_class: f
                    .child_text(TYPES, "FolderClass")
                    .map(|c| c.trim().to_owned()),
            })
        })
        .collect::<Result<Vec<_>, EwsError>>()?;
    let (next_offset, includes_last_item_in_range) = paging(found);
    Ok(FolderPage {
        folders,
        next_offset,
        includes_last_item_in_range,
    })
}

/// Decodes one envelope cut from a `GetStreamingEvents` response body.
pub fn parse_stream_envelope(bytes: &[u8]) -> Result<StreamBatch, EwsError> {
    let root = parse(bytes)?;
    let mut batch = StreamBatch::default();
    for msg in response_messages(&root, "GetStreamingEvents")? {
        if let Some(list) = msg.child(MESSAGES, "Notifications") {
            for n in list.children_named(MESSAGES, "Notification") {
                batch.notifications.push(decode_notification(n)?);
            }
        }
        if let Err(error) = check_class(msg) {
            // Deployed clients read these children as m:SubscriptionId although the schema
            // says t:, so match by local name.
            let subscription_ids = msg
                .child_by_local("ErrorSubscriptionIds")
                .map(|ids| {
                    ids.children
                        .iter()
                        .filter(|c| c.local == "SubscriptionId")
                        .map(|c| c.text.trim().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            batch.errors.push(SubscriptionError {
                error,
                subscription_ids,
            });
        }
        if let Some(status) = msg.child_text(MESSAGES, "ConnectionStatus") {
            batch.status = match status.trim() {
                "OK" => Some(ConnectionStatus::Ok),
                "Closed" => Some(ConnectionStatus::Closed),
                other => {
                    return Err(EwsError::Malformed(format!(
                        "unknown ConnectionStatus {other:?}"
                    )));
                }
            };
        }
    }
    Ok(batch)
}

/// What a server says of itself in every answer's `soap:Header` (`t:ServerVersionInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersionInfo {
    pub major: u32,
    pub minor: u32,
    pub build: u32,
    /// The `Version` attribute: `Exchange2010_SP2` on Exchange 2010, a schema date such as
    /// `V2017_07_11` from Exchange 2013 on.
    pub version: Option<String>,
}

impl ServerVersionInfo {
    /// The newest request version this server accepts, or `None` for a server without
    /// streaming notifications (older than Exchange 2010 SP1).
    pub fn request_version(&self) -> Option<ServerVersion> {
        if let Some(v) = self.version.as_deref().and_then(ServerVersion::parse) {
            return Some(v);
        }
        match (self.major, self.minor) {
            (m, _) if m < 14 => None,
            (14, 0) => None,
            (14, 1) => Some(ServerVersion::Exchange2010Sp1),
            (14, _) => Some(ServerVersion::Exchange2010Sp2),
            // Exchange 2013 SP1 is build 15.0.847.
            (15, 0) if self.build < 847 => Some(ServerVersion::Exchange2013),
            (15, 0) => Some(ServerVersion::Exchange2013Sp1),
            _ => Some(ServerVersion::Exchange2016),
        }
    }
}

/// The `ServerVersionInfo` in an answer's header, whatever its body (faults included).
pub fn server_version_info(bytes: &[u8]) -> Option<ServerVersionInfo> {
    let root = parse(bytes).ok()?;
    let info = root
        .child(SOAP, "Header")?
        .child_by_local("ServerVersionInfo")?;
    let number = |name: &str| info.attr(name).and_then(|v| v.trim().parse::<u32>().ok());
    Some(ServerVersionInfo {
        major: number("MajorVersion")?,
        minor: number("MinorVersion")?,
        build: number("MajorBuildNumber").unwrap_or(0),
        version: info.attr("Version").map(str::to_owned),
    })
}

/// The `soap:Body` of an envelope, or the fault it carries.
fn body(root: &Element) -> Result<&Element, EwsError> {
    if !root.is(SOAP, "Envelope") {
        return Err(EwsError::Malformed(format!(
            "root element is {{{}}}{}, not a SOAP Envelope",
            root.ns.as_deref().unwrap_or(""),
            root.local
        )));
    }
    let body = root
        .child(SOAP, "Body")
        .ok_or_else(|| EwsError::Malformed("Envelope without Body".into()))?;
    if let Some(fault) = body.child(SOAP, "Fault") {
        return Err(EwsError::Fault(decode_fault(fault)));
    }
    Ok(body)
}

/// The `…ResponseMessage` elements of operation `op`.
fn response_messages<'a>(
    root: &'a Element,
    op: &str,
) -> Result<impl Iterator<Item = &'a Element> + 'a, EwsError> {
    let response = body(root)?
        .child(MESSAGES, &format!("{op}Response"))
        .ok_or_else(|| EwsError::Malformed(format!("Body without {op}Response")))?;
    let messages = response
        .child(MESSAGES, "ResponseMessages")
        .ok_or_else(|| EwsError::Malformed(format!("{op}Response without ResponseMessages")))?;
    let name = format!("{op}ResponseMessage");
    Ok(messages
        .children
        .iter()
        .filter(move |c| c.ns.as_deref() == Some(MESSAGES) && c.local == name))
}

fn single_message<'a>(root: &'a Element, op: &str) -> Result<&'a Element, EwsError> {
    response_messages(root, op)?
        .next()
        .ok_or_else(|| EwsError::Malformed(format!("{op}Response without a response message")))
}

/// `Ok` for `ResponseClass="Success"` (and `Warning` with `NoError`), else the error it reports.
fn check_class(msg: &Element) -> Result<(), ResponseError> {
    let code = msg
        .child_text(MESSAGES, "ResponseCode")
        .map(str::trim)
        .unwrap_or("");
    let class = msg.attr("ResponseClass").unwrap_or("Success");
    if class == "Success" || (class == "Warning" && code == "NoError") {
        return Ok(());
    }
    Err(ResponseError {
        code: if code.is_empty() {
            "ErrorUnknown".into()
        } else {
            code.to_owned()
        },
        message: msg
            .child_text(MESSAGES, "MessageText")
            .unwrap_or("")
            .trim()
            .to_owned(),
        back_off: msg.child_by_local("MessageXml").and_then(back_off),
    })
}

fn decode_fault(fault: &Element) -> Fault {
    // faultcode, faultstring and detail are unqualified; the detail's children are in the
    // errors namespace, except MessageXml, which is in types here (messages elsewhere).
    let unqualified = |name: &str| {
        fault
            .children
            .iter()
            .find(|c| c.ns.is_none() && c.local == name)
    };
    let detail = unqualified("detail");
    let detail_text = |name: &str| {
        detail
            .and_then(|d| d.child_by_local(name))
            .map(|e| e.text.trim().to_owned())
    };
    let code = detail_text("ResponseCode")
        .or_else(|| {
            unqualified("faultcode").map(|c| {
                let t = c.text.trim();
                t.rsplit(':').next().unwrap_or(t).to_owned()
            })
        })
        .unwrap_or_else(|| "ErrorUnknown".into());
    let message = detail_text("Message")
        .or_else(|| unqualified("faultstring").map(|s| s.text.trim().to_owned()))
        .unwrap_or_default();
    Fault {
        code,
        message,
        back_off: detail
            .and_then(|d| d.child_by_local("MessageXml"))
            .and_then(back_off),
    }
}

/// `Value[@Name="BackOffMilliseconds"]` inside a `MessageXml`.
fn back_off(message_xml: &Element) -> Option<Duration> {
    message_xml
        .children
        .iter()
        .find(|v| v.local == "Value" && v.attr("Name") == Some("BackOffMilliseconds"))
        .and_then(|v| v.text.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
}

fn decode_notification(n: &Element) -> Result<Notification, EwsError> {
    let subscription_id = n
        .child_text(TYPES, "SubscriptionId")
        .map(|s| s.trim().to_owned())
        .ok_or_else(|| EwsError::Malformed("Notification without SubscriptionId".into()))?;
    let events = n
        .children
        .iter()
        .filter(|c| c.ns.as_deref() == Some(TYPES) && c.local.ends_with("Event"))
        .map(decode_event)
        .collect();
    Ok(Notification {
        subscription_id,
        events,
    })
}

fn decode_event(ev: &Element) -> Event {
    let kind = match ev.local.as_str() {
        "NewMailEvent" => EventKind::NewMail,
        "CreatedEvent" => EventKind::Created,
        "DeletedEvent" => EventKind::Deleted,
        "ModifiedEvent" => EventKind::Modified,
        "MovedEvent" => EventKind::Moved,
        "CopiedEvent" => EventKind::Copied,
        "FreeBusyChangedEvent" => EventKind::FreeBusyChanged,
        "StatusEvent" => EventKind::Status,
        other => EventKind::Other(other.to_owned()),
    };
    let target = if let Some(item) = ev.child(TYPES, "ItemId") {
        item_id(item).map(EventTarget::Item)
    } else {
        ev.child(TYPES, "FolderId")
            .and_then(|f| f.attr("Id"))
            .map(|id| EventTarget::Folder(id.to_owned()))
    };
    Event {
        kind,
        timestamp: ev
            .child_text(TYPES, "TimeStamp")
            .map(|t| t.trim().to_owned()),
        target,
        parent_folder_id: ev
            .child(TYPES, "ParentFolderId")
            .and_then(|f| f.attr("Id"))
            .map(str::to_owned),
    }
}

fn item_id(el: &Element) -> Option<ItemId> {
    Some(ItemId {
        id: el.attr("Id")?.to_owned(),
        change_key: el.attr("ChangeKey").map(str::to_owned),
    })
}

fn mailbox(el: &Element) -> Mailbox {
    Mailbox {
        name: el.child_text(TYPES, "Name").map(|s| s.trim().to_owned()),
        email: el
            .child_text(TYPES, "EmailAddress")
            .map(|s| s.trim().to_owned()),
    }
}

fn single_mailbox(item: &Element, field: &str) -> Option<Mailbox> {
    item.child(TYPES, field)
        .and_then(|f| f.child(TYPES, "Mailbox"))
        .map(mailbox)
}

fn mailbox_list(item: &Element, field: &str) -> Vec<Mailbox> {
    item.child(TYPES, field)
        .map(|f| f.children_named(TYPES, "Mailbox").map(mailbox).collect())
        .unwrap_or_default()
}

fn decode_message(item: &Element) -> Result<Message, EwsError> {
    let text = |name: &str| item.child_text(TYPES, name).map(str::to_owned);
    let mime_content = match item.child_text(TYPES, "MimeContent") {
        None => None,
        Some(b64) => {
            let engine = base64::engine::general_purpose::STANDARD;
            // Exchange sends it on one line; a server that wraps it costs a copy.
            let decoded = if b64.bytes().any(|b| b.is_ascii_whitespace()) {
                let compact: Vec<u8> = b64.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
                engine.decode(compact)
            } else {
                engine.decode(b64)
            };
            Some(
                decoded
                    .map_err(|e| EwsError::Malformed(format!("MimeContent is not base64: {e}")))?,
            )
        }
    };
    let body = item.child(TYPES, "Body");
    Ok(Message {
        item_id: item.child(TYPES, "ItemId").and_then(item_id),
        subject: text("Subject"),
        body: body.map(|b| b.text.clone()),
        body_is_html: body
            .and_then(|b| b.attr("BodyType"))
            .is_some_and(|t| t.eq_ignore_ascii_case("HTML")),
        date_time_received: text("DateTimeReceived"),
        date_time_sent: text("DateTimeSent"),
        importance: text("Importance"),
        sender: single_mailbox(item, "Sender"),
        from: single_mailbox(item, "From"),
        to: mailbox_list(item, "ToRecipients"),
        cc: mailbox_list(item, "CcRecipients"),
        internet_message_id: text("InternetMessageId").map(|s| s.trim().to_owned()),
        mime_content,
    })
}

#[cfg(test)]
mod tests;
