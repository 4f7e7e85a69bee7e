//! Watching a mailbox on its one connection: a task that IDLEs on the first watched folder
//! between the worker's commands, and on news, on a wake, or when the server has no IDLE on
//! each poll, looks at every watched folder's STATUS and reports the UIDs that came since.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connection::Connection;
use super::failure::ImapFailure;
use super::session::{Session, Untagged, quoted};
use super::{Marks, examine, item_id, search};
use crate::engine::protocol::{Answer, Watch, WatchBatch};

/// What the watch task found and the worker has not yet taken.
#[derive(Default)]
struct Found {
    new_items: Vec<String>,
    /// A look ended since the last report: the worker hears even an empty one, so a silent
    /// connection is found.
    looked: bool,
    failure: Option<ImapFailure>,
}

#[derive(Default)]
struct Reports {
    found: Mutex<Found>,
    ready: Notify,
}

/// The worker's end of a watch; dropping it stops the task.
pub(super) struct ImapWatch {
    reports: Arc<Reports>,
    task: tokio::task::AbortHandle,
}

impl ImapWatch {
    pub fn start(connection: Arc<Connection>, marks: Marks, wake: Duration) -> ImapWatch {
        let reports = Arc::new(Reports::default());
        let task = tokio::spawn(watch(connection, marks, wake, reports.clone()));
        ImapWatch {
            reports,
            task: task.abort_handle(),
        }
    }
}

impl Drop for ImapWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch for ImapWatch {
    fn next(&mut self) -> Answer<'_, Option<WatchBatch>> {
        async move {
            loop {
                {
                    let mut found = self.reports.found.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(failure) = found.failure.take() {
                        return Err(failure.into());
                    }
                    if std::mem::take(&mut found.looked) {
                        return Ok(Some(WatchBatch {
                            new_items: std::mem::take(&mut found.new_items),
                            ..WatchBatch::default()
                        }));
                    }
                }
                self.reports.ready.notified().await;
            }
        }
        .boxed()
    }
}

/// Why a wait on the connection ended.
#[derive(Debug, PartialEq)]
enum Woken {
    /// The first folder has news.
    News,
    /// Time to look at every folder.
    Wake,
    /// A command wants the connection.
    Wanted,
    /// The server cannot IDLE: looked at after each poll interval.
    CannotIdle,
}

async fn watch(connection: Arc<Connection>, marks: Marks, wake: Duration, reports: Arc<Reports>) {
    let result: Result<(), ImapFailure> = async {
        // The first report comes at once: what arrived since Subscribe.
        let mut look_now = true;
        loop {
            if look_now {
                let news = connection
                    .run_for_watch(async |s| look(s, &marks).await)
                    .await?;
                let mut found = reports.found.lock().unwrap_or_else(|p| p.into_inner());
                found.new_items.extend(news);
                found.looked = true;
                drop(found);
                reports.ready.notify_one();
            }
            let deadline = Instant::now() + wake;
            let woken = loop {
                let woken = connection
                    .run_for_watch(async |s| idle(s, &connection, &marks, deadline).await)
                    .await?;
                match woken {
                    Woken::Wanted => {
                        // Let the command have the connection, then IDLE again.
                        tokio::task::yield_now().await;
                    }
                    Woken::CannotIdle => {
                        tokio::time::sleep_until(deadline).await;
                        break Woken::Wake;
                    }
                    woken => break woken,
                }
            };
            look_now = matches!(woken, Woken::News | Woken::Wake);
        }
    }
    .await;
    if let Err(failure) = result {
        reports
            .found
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failure = Some(failure);
        reports.ready.notify_one();
    }
}

/// IDLE on the first watched folder until it has news, `deadline` comes, or a command wants
/// the connection. Mail that came since the last look is news at once.
async fn idle(
    s: &mut Session,
    connection: &Connection,
    marks: &Marks,
    deadline: Instant,
) -> Result<Woken, ImapFailure> {
    let first = marks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .first()
        .cloned();
    let Some((folder, _, next)) = first else {
        return Ok(Woken::CannotIdle);
    };
    if connection.is_wanted() {
        return Ok(Woken::Wanted);
    }
    let selected = examine(s, &folder).await?;
    if selected.next.is_some_and(|n| n > next) {
        return Ok(Woken::News);
    }
    if !s.has("IDLE") {
        return Ok(Woken::CannotIdle);
    }
    notify_of_the_others(s, marks).await?;
    let (tag, before) = s.idle().await?;
    let mut woken = before.iter().any(is_news).then_some(Woken::News);
    while woken.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            biased;
            // A ring left from a command that already ran is not a command waiting.
            () = connection.wanted.notified() => if connection.is_wanted() {
                woken = Some(Woken::Wanted)
            },
            news = s.idle_news(left) => match news? {
                None => woken = Some(Woken::Wake),
                Some(u) if is_news(&u) => woken = Some(Woken::News),
                Some(_) => {}
            },
        }
    }
    let after = s.idle_done(&tag).await?;
    if after.iter().any(is_news) {
        return Ok(Woken::News);
    }
    Ok(woken.unwrap_or(Woken::Wake))
}

/// New mail in the selected folder (EXISTS), or NOTIFY's word of a change in another (STATUS).
fn is_news(u: &Untagged) -> bool {
    matches!(u, Untagged::Exists(_) | Untagged::Status { .. })
}

/// Where the server offers NOTIFY (RFC 5465), asks it once a connection to tell of new mail
/// in the watched folders after the first during IDLE as well, so they need no wait for the
/// next look. A server that refuses is looked at as one without NOTIFY.
async fn notify_of_the_others(s: &mut Session, marks: &Marks) -> Result<(), ImapFailure> {
    let others: Vec<String> = marks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .skip(1)
        .map(|(folder, _, _)| folder.clone())
        .collect();
    if others.is_empty() || !s.has("NOTIFY") || s.notifying.as_ref() == Some(&others) {
        return Ok(());
    }
    let names = others
        .iter()
        .map(|f| quoted(f))
        .collect::<Result<Vec<_>, _>>()?
        .join(" ");
    // MessageNew goes with MessageExpunge (RFC 5465, 5.2); a folder not selected is told of by
    // a STATUS answer.
    let command = format!(
        "NOTIFY SET (SELECTED (MessageNew MessageExpunge)) (MAILBOXES ({names}) (MessageNew MessageExpunge))"
    );
    match s.ok(&command).await {
        Ok(_) => {}
        Err(refused @ ImapFailure::Refused { .. }) => {
            tracing::debug!(error = %refused, "no NOTIFY: the folders after the first are looked at");
        }
        Err(e) => return Err(e),
    }
    s.notifying = Some(others);
    Ok(())
}

/// Every watched folder's news since its mark; the marks move past it.
async fn look(s: &mut Session, marks: &Marks) -> Result<Vec<String>, ImapFailure> {
    let watched = marks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut new_items = Vec::new();
    for (folder, validity, next) in watched {
        let status = s
            .ok(&format!(
                "STATUS {} (UIDNEXT UIDVALIDITY)",
                quoted(&folder)?
            ))
            .await?;
        let (now_next, now_validity) = status
            .into_iter()
            .find_map(|u| match u {
                Untagged::Status {
                    uid_next,
                    uid_validity,
                    ..
                } => Some((uid_next, uid_validity)),
                _ => None,
            })
            .unwrap_or((None, None));
        if now_validity.is_some_and(|v| v != validity) {
            return Err(ImapFailure::ValidityChanged { folder });
        }
        if now_next.is_some_and(|n| n <= next) {
            continue;
        }
        let selected = examine(s, &folder).await?;
        if selected.validity != validity {
            return Err(ImapFailure::ValidityChanged { folder });
        }
        let news: Vec<u32> = search(s, &format!("UID {next}:*"))
            .await?
            .into_iter()
            .filter(|&u| u >= next)
            .collect();
        if let Some(&last) = news.last() {
            let mut all = marks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(mark) = all.iter_mut().find(|(f, _, _)| *f == folder) {
                mark.2 = mark.2.max(last + 1);
            }
        }
        new_items.extend(news.into_iter().map(|u| item_id(validity, u, &folder)));
    }
    Ok(new_items)
}
