//! Which of a mailbox's folders hold the mail a listener watches when Creatio names none.

/// The mail folders of a folder tree (`IPF.Note` and its subclasses): the inbox first, as the
/// distinguished `inbox`, then the rest in the tree's order, leaving out the `unwatched`
/// folders (drafts, deleted items, junk mail, outbox) and everything below them.
pub(super) fn mail_folders(
    found: &[ews::FoundFolder],
    inbox: Option<&str>,
    unwatched: &[String],
) -> Vec<String> {
    let parent_of = |id: &str| {
        found
            .iter()
            .find(|f| f.id == id)
            .and_then(|f| f.parent_id.as_deref())
    };
    let left_out = |id: &str| crate::engine::protocol::inside_any(id, unwatched, parent_of);
    let is_mail = |f: &ews::FoundFolder| {
        f.folder_class.as_deref().is_some_and(|c| {
            c.eq_ignore_ascii_case("IPF.Note")
                || c.get(..9)
                    .is_some_and(|p| p.eq_ignore_ascii_case("IPF.Note."))
        })
    };
    let mut out = vec!["inbox".to_owned()];
    out.extend(
        found
            .iter()
            .filter(|f| is_mail(f) && Some(f.id.as_str()) != inbox && !left_out(&f.id))
            .map(|f| f.id.clone()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(id: &str, parent: &str, class: &str) -> ews::FoundFolder {
        ews::FoundFolder {
            id: id.into(),
            parent_id: Some(parent.into()),
            display_name: id.into(),
            folder_class: (!class.is_empty()).then(|| class.into()),
        }
    }

    #[test]
    fn every_mail_folder_but_drafts_deleted_junk_and_outbox() {
        let tree = [
            folder("INBOX", "ROOT", "IPF.Note"),
            folder("projects", "INBOX", "IPF.Note"),
            folder("sent", "ROOT", "IPF.Note"),
            folder("drafts", "ROOT", "IPF.Note"),
            folder("deleted", "ROOT", "IPF.Note"),
            folder("old-project", "deleted", "IPF.Note"),
            folder("junk", "ROOT", "IPF.Note"),
            folder("calendar", "ROOT", "IPF.Appointment"),
            folder("rss", "ROOT", "IPF.Note.OutlookHomepage"),
            folder("unclassed", "ROOT", ""),
        ];
        let unwatched = ["drafts".to_owned(), "deleted".to_owned(), "junk".to_owned()];
        assert_eq!(
            mail_folders(&tree, Some("INBOX"), &unwatched),
            ["inbox", "projects", "sent", "rss"]
        );
        // A server that would not say where the inbox is: it is watched all the same.
        assert_eq!(mail_folders(&[], None, &[]), ["inbox"]);
    }
}
