//! The folder tree every mock mailbox has, and how requests name its folders: by a
//! distinguished id (`inbox`, `sentitems`, ...) or by the opaque id FindFolder lists.

use base64::Engine as _;

/// A folder of the tree: its display name, class, the element FindFolder lists it as, and its
/// parent (none for a folder at the top of the information store).
pub(crate) type Folder = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
);

/// The folders below the top of the information store, in the order FindFolder lists them.
pub(crate) const FOLDERS: [Folder; 9] = [
    ("Inbox", "IPF.Note", "Folder", None),
    ("Projects", "IPF.Note", "Folder", Some("Inbox")),
    ("Sent Items", "IPF.Note", "Folder", None),
    ("Drafts", "IPF.Note", "Folder", None),
    ("Deleted Items", "IPF.Note", "Folder", None),
    ("Junk Email", "IPF.Note", "Folder", None),
    ("Calendar", "IPF.Appointment", "CalendarFolder", None),
    ("Contacts", "IPF.Contact", "ContactsFolder", None),
    ("Tasks", "IPF.Task", "TasksFolder", None),
];

/// The inbox's name, where mail arrives unless told otherwise.
pub(crate) const INBOX: &str = "Inbox";

/// Sent Items' name, where a sender keeps its copy.
pub(crate) const SENT_ITEMS: &str = "Sent Items";

fn key(mailbox: &str) -> String {
    mailbox.trim().to_ascii_lowercase()
}

/// The inbox folder id of a mailbox: stable, opaque.
pub(crate) fn inbox_id(mailbox: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("inbox:{}", key(mailbox)))
}

/// The root folder id of a mailbox.
pub(crate) fn root_id(mailbox: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("root:{}", key(mailbox)))
}

/// A folder's id (the top of the information store's for none): the inbox's as every other
/// operation names it, the rest by name.
pub(crate) fn folder_id(mailbox: &str, name: Option<&str>) -> String {
    match name {
        None => root_id(mailbox),
        Some(INBOX) => inbox_id(mailbox),
        Some(other) => base64::engine::general_purpose::STANDARD
            .encode(format!("folder:{other}:{}", key(mailbox))),
    }
}

/// The folder a distinguished id or a folder id names.
pub(crate) fn named(mailbox: &str, id: &str) -> Option<&'static Folder> {
    let name = match id {
        "inbox" => INBOX,
        "sentitems" => SENT_ITEMS,
        "drafts" => "Drafts",
        "deleteditems" => "Deleted Items",
        "junkemail" => "Junk Email",
        "calendar" => "Calendar",
        "contacts" => "Contacts",
        "tasks" => "Tasks",
        other => {
            return FOLDERS
                .iter()
                .find(|f| folder_id(mailbox, Some(f.0)) == other);
        }
    };
    FOLDERS.iter().find(|f| f.0 == name)
}

/// The folder of this name, matched case-insensitively (the control API's `folder`).
pub(crate) fn by_name(name: &str) -> Option<&'static Folder> {
    FOLDERS
        .iter()
        .find(|f| f.0.eq_ignore_ascii_case(name.trim()))
}
