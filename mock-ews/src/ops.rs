//! One function per EWS operation (streaming aside): the acting mailbox and the decoded
//! request in, the HTTP response out.

use axum::http::{StatusCode, header};
use axum::response::Response;

use crate::folders::{self, FOLDERS, folder_id};
use crate::server::xml;
use crate::soap::{self, Shape};
use crate::state::World;

/// The mailbox a request names, or the acting one.
fn named_or_acting(mailbox: Option<String>, acting: &str) -> String {
    mailbox
        .map(|m| m.to_ascii_lowercase())
        .unwrap_or_else(|| acting.to_owned())
}

/// The error message of an operation on a folder the mailbox does not have.
fn folder_not_found(op: &str) -> String {
    soap::error(
        op,
        "ErrorFolderNotFound",
        "The specified folder could not be found in the store.",
        "",
    )
}

/// An answer of one error message, with HTTP 200 as EWS refuses a request it read.
fn refused(op: &str, code: &str, text: &str) -> Response {
    xml(
        StatusCode::OK,
        soap::response(op, &soap::error(op, code, text, "")),
    )
}

pub(crate) fn subscribe(
    world: &World,
    (principal, acting): (&str, &str),
    streaming: bool,
    (mailbox, folders): (Option<String>, Option<Vec<String>>),
    event_types: Vec<String>,
) -> Response {
    let target = named_or_acting(mailbox, acting);
    let folders = match folders {
        None => None,
        Some(ids) => {
            let named: Option<Vec<&'static str>> = ids
                .iter()
                .map(|id| folders::named(&target, id).map(|f| f.0))
                .collect();
            let Some(named) = named else {
                return xml(
                    StatusCode::OK,
                    soap::response("Subscribe", &folder_not_found("Subscribe")),
                );
            };
            Some(named)
        }
    };
    if target != acting {
        return refused(
            "Subscribe",
            "ErrorSubscriptionDelegateAccessNotSupported",
            "Delegate access is not supported by this server.",
        );
    }
    let Ok(id) = world.subscribe(&target, principal, folders, event_types) else {
        return refused(
            "Subscribe",
            "ErrorExceededSubscriptionCount",
            "You have exceeded the maximum number of subscriptions for this mailbox.",
        );
    };
    let mut inner = format!("<m:SubscriptionId>{}</m:SubscriptionId>", soap::esc(&id));
    if !streaming {
        inner.push_str("<m:Watermark>AQAAAA==</m:Watermark>");
    }
    let mut response = xml(
        StatusCode::OK,
        soap::response("Subscribe", &soap::success("Subscribe", &inner)),
    );
    // The affinity cookie names the mailbox's server; without `secure` over plain http so
    // cookie jars send it back.
    let cookie = format!(
        "X-BackEndOverrideCookie={}~1; path=/; HttpOnly",
        world.backend_of(&target)
    );
    if let Ok(v) = cookie.parse() {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

pub(crate) fn unsubscribe(world: &World, principal: &str, id: &str) -> Response {
    let msg = if world.unsubscribe(principal, id) {
        soap::success("Unsubscribe", "")
    } else {
        soap::error(
            "Unsubscribe",
            "ErrorSubscriptionNotFound",
            "The specified subscription was not found.",
            "",
        )
    };
    xml(StatusCode::OK, soap::response("Unsubscribe", &msg))
}

pub(crate) fn get_item(world: &World, acting: &str, ids: &[String], shape: &Shape) -> Response {
    let mut messages = String::new();
    for item in world.items(acting, ids) {
        messages.push_str(&match item {
            Some(item) => soap::success(
                "GetItem",
                &format!("<m:Items>{}</m:Items>", soap::message(acting, &item, shape)),
            ),
            None => soap::error(
                "GetItem",
                "ErrorItemNotFound",
                "The specified object was not found in the store.",
                "<m:Items/>",
            ),
        });
    }
    xml(StatusCode::OK, soap::response("GetItem", &messages))
}

/// GetItem under an `item_error` fault: every item fails with `code`.
pub(crate) fn get_item_failing(ids: &[String], code: &str) -> Response {
    let messages: String = ids
        .iter()
        .map(|_| {
            soap::error(
                "GetItem",
                code,
                "The item cannot be read right now.",
                "<m:Items/>",
            )
        })
        .collect();
    xml(StatusCode::OK, soap::response("GetItem", &messages))
}

pub(crate) fn get_folder(
    world: &World,
    acting: &str,
    folders: Vec<(String, Option<String>)>,
) -> Response {
    let mut messages = String::new();
    for (id, mailbox) in folders {
        let mailbox = named_or_acting(mailbox, acting);
        let known =
            id == "root" || id == "msgfolderroot" || folders::named(&mailbox, &id).is_some();
        messages.push_str(&if !known {
            folder_not_found("GetFolder")
        } else if mailbox != acting {
            soap::error("GetFolder", "ErrorAccessDenied", "Access is denied.", "")
        } else {
            soap::success("GetFolder", &folder_xml(world, &mailbox, &id))
        });
    }
    xml(StatusCode::OK, soap::response("GetFolder", &messages))
}

/// CreateItem of a message to send: delivered to the recipients living here, a copy kept in
/// the sender's Sent Items with `SendAndSaveCopy`. Saving a draft (`SaveOnly`) is not served.
pub(crate) fn create_item(
    world: &World,
    acting: &str,
    disposition: &str,
    message: crate::soap::Outgoing,
) -> Response {
    const OP: &str = "CreateItem";
    let keep_copy = match disposition {
        "SendAndSaveCopy" => true,
        "SendOnly" => false,
        _ => {
            return refused(
                OP,
                "ErrorInvalidOperation",
                "mock-ews sends messages only (SendAndSaveCopy or SendOnly).",
            );
        }
    };
    let msg = match world.send(acting, message.mail, &message.bcc, keep_copy) {
        Ok(_) => soap::success(OP, "<m:Items/>"),
        Err(code) => soap::error(OP, code, &refusal_text(code), ""),
    };
    xml(StatusCode::OK, soap::response(OP, &msg))
}

/// Exchange's words for a refused message.
fn refusal_text(code: &str) -> String {
    match code {
        "ErrorMessageSizeExceeded" => "The message exceeds the maximum supported size.".into(),
        "ErrorInvalidRecipients" => "At least one recipient is not valid.".into(),
        other => format!("The message could not be sent ({other})."),
    }
}

/// The acting mailbox and the folder of it a folder reference names; else the error message
/// for operation `op`.
fn folder_of(
    acting: &str,
    op: &str,
    folder: &str,
    mailbox: Option<String>,
) -> Result<(String, &'static str), String> {
    let mailbox = named_or_acting(mailbox, acting);
    if mailbox != acting {
        return Err(soap::error(
            op,
            "ErrorAccessDenied",
            "Access is denied.",
            "",
        ));
    }
    match folders::named(&mailbox, folder) {
        Some(f) => Ok((mailbox, f.0)),
        None => Err(folder_not_found(op)),
    }
}

pub(crate) fn sync_folder_items(
    world: &World,
    acting: &str,
    folder: &str,
    mailbox: Option<String>,
    sync_state: Option<&str>,
    max_changes: usize,
) -> Response {
    let msg = folder_of(acting, SYNC, folder, mailbox).map(|(mailbox, folder)| {
        match world.sync(&mailbox, folder, sync_state, max_changes) {
            Some(page) => soap::success(SYNC, &soap::sync_page(&page)),
            None => invalid_sync_state_message(),
        }
    });
    xml(
        StatusCode::OK,
        soap::response(SYNC, &msg.unwrap_or_else(|e| e)),
    )
}

const SYNC: &str = "SyncFolderItems";

fn invalid_sync_state_message() -> String {
    soap::error(
        SYNC,
        "ErrorInvalidSyncStateData",
        "Synchronization state data is corrupt or otherwise invalid.",
        "",
    )
}

/// The answer to a SyncFolderItems whose state the server will not take.
pub(crate) fn invalid_sync_state() -> Response {
    xml(
        StatusCode::OK,
        soap::response(SYNC, &invalid_sync_state_message()),
    )
}

/// FindItem on a folder: a page of the items the query admits, in its order, with
/// exchangelib's paging attributes.
pub(crate) fn find_item(
    world: &World,
    acting: &str,
    (folder, mailbox): (String, Option<String>),
    shape: &Shape,
    (offset, max_entries): (usize, usize),
    query: &crate::soap::ItemQuery,
) -> Response {
    const OP: &str = "FindItem";
    let msg = folder_of(acting, OP, &folder, mailbox).map(|(mailbox, folder)| {
        let (items, total) = world.page(&mailbox, folder, (offset, max_entries), query);
        let next = offset + items.len();
        let listed: String = items.iter().map(|item| soap::message(&mailbox, item, shape)).collect();
        soap::success(
            OP,
            &format!(
                r#"<m:RootFolder IndexedPagingOffset="{next}" TotalItemsInView="{total}" IncludesLastItemInRange="{}"><t:Items>{listed}</t:Items></m:RootFolder>"#,
                next >= total
            ),
        )
    });
    xml(
        StatusCode::OK,
        soap::response(OP, &msg.unwrap_or_else(|e| e)),
    )
}

/// ConvertId: every id is reported malformed. A client probing the server version needs only
/// a well-formed answer with `ServerVersionInfo`.
pub(crate) fn convert_id(ids: usize) -> Response {
    const OP: &str = "ConvertId";
    let messages: String = (0..ids.max(1))
        .map(|_| soap::error(OP, "ErrorInvalidIdMalformed", "Id is malformed.", ""))
        .collect();
    xml(StatusCode::OK, soap::response(OP, &messages))
}

fn folder_xml(world: &World, mailbox: &str, which: &str) -> String {
    let (id, parent, name, class, element) = match folders::named(mailbox, which) {
        Some((name, class, element, parent)) => (
            folder_id(mailbox, Some(name)),
            folder_id(mailbox, *parent),
            *name,
            *class,
            *element,
        ),
        None => (
            folders::root_id(mailbox),
            folders::root_id(mailbox),
            "Top of Information Store",
            "IPF.Note",
            "Folder",
        ),
    };
    let total = match name {
        "Top of Information Store" => 0,
        name => world.item_count(mailbox, name),
    };
    format!(
        concat!(
            r#"<m:Folders><t:{element}><t:FolderId Id="{id}" ChangeKey="AQAAAA=="/><t:ParentFolderId Id="{parent}" ChangeKey="AQAAAA=="/>"#,
            "<t:FolderClass>{class}</t:FolderClass><t:DisplayName>{name}</t:DisplayName><t:TotalCount>{total}</t:TotalCount>",
            "<t:ChildFolderCount>0</t:ChildFolderCount><t:UnreadCount>{total}</t:UnreadCount></t:{element}></m:Folders>"
        ),
        element = element,
        id = soap::esc(&id),
        parent = soap::esc(&parent),
        class = class,
        name = name,
        total = total
    )
}

/// FindFolder below the top of the acting mailbox (`msgfolderroot` or `root`) or below its
/// inbox: every level (`Deep`) or the children, a page at a time.
pub(crate) fn find_folder(
    acting: &str,
    (folder, mailbox): (String, Option<String>),
    deep: bool,
    offset: usize,
    max_entries: usize,
) -> Response {
    const OP: &str = "FindFolder";
    let mailbox = named_or_acting(mailbox, acting);
    if mailbox != acting {
        return refused(OP, "ErrorAccessDenied", "Access is denied.");
    }
    let below = match folder.as_str() {
        "msgfolderroot" | "root" => None,
        "inbox" => Some("Inbox"),
        id if id == folders::root_id(&mailbox) => None,
        id if id == folders::inbox_id(&mailbox) => Some("Inbox"),
        _ => return xml(StatusCode::OK, soap::response(OP, &folder_not_found(OP))),
    };
    let under = |parent: Option<&str>| -> bool {
        let mut at = parent;
        loop {
            if at == below {
                return true;
            }
            if !deep {
                return false;
            }
            match at {
                None => return false,
                Some(name) => at = FOLDERS.iter().find(|f| f.0 == name).and_then(|f| f.3),
            }
        }
    };
    let listed: Vec<_> = FOLDERS.iter().filter(|f| under(f.3)).collect();
    let page: String = listed
        .iter()
        .skip(offset)
        .take(max_entries)
        .map(|(name, class, element, parent)| {
            format!(
                concat!(
                    r#"<t:{element}><t:FolderId Id="{id}" ChangeKey="AQAAAA=="/><t:ParentFolderId Id="{parent}" ChangeKey="AQAAAA=="/>"#,
                    "<t:FolderClass>{class}</t:FolderClass><t:DisplayName>{name}</t:DisplayName></t:{element}>"
                ),
                element = element,
                id = soap::esc(&folder_id(&mailbox, Some(name))),
                parent = soap::esc(&folder_id(&mailbox, *parent)),
                class = class,
                name = soap::esc(name),
            )
        })
        .collect();
    let end = (offset + max_entries).min(listed.len());
    let root = format!(
        r#"<m:RootFolder IndexedPagingOffset="{end}" TotalItemsInView="{}" IncludesLastItemInRange="{}"><t:Folders>{page}</t:Folders></m:RootFolder>"#,
        listed.len(),
        end >= listed.len()
    );
    xml(
        StatusCode::OK,
        soap::response(OP, &soap::success(OP, &root)),
    )
}
