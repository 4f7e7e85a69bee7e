//! The load a run puts on the listener: mail sent at the scenario's rate, and Creatio's
//! own minute loop asking after its mailboxes and creating again those it lost.

use super::*;

/// Where the listener reaches Exchange and Creatio (through the run's fault proxies), for the
/// credentials a send carries.
pub(super) struct Bases {
    pub(super) creatio: String,
}

/// Sends mail at the scenario's rate until `stop`, to mailboxes chosen at random (closed ones
/// too: what they get must not reach Creatio): put into them by mock-ews, or sent to them by
/// another scenario mailbox through the listener.
pub(super) async fn send_mail(
    sh: Shared,
    mail: crate::scenario::Mail,
    bases: Bases,
    until: Instant,
) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(mail.seed);
    let body = "x".repeat(mail.bytes);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / mail.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= until {
            return Ok(());
        }
        let m = rng.usize(0..sh.mailboxes);
        let secs = sh.secs();
        let unix_us = unix_now_us();
        if mail.via == crate::scenario::MailVia::Send {
            // From another mailbox, chosen at random.
            let from = (m + 1 + rng.usize(0..sh.mailboxes - 1)) % sh.mailboxes;
            let key = format!("<harness-{n}@harness.test>");
            let sent = send_through_listener(&sh, &bases, n as usize, from, m, &key, &body).await;
            n += 1;
            let closed = sh.closed.lock().unwrap_or_else(|p| p.into_inner()).clone();
            // It reaches Creatio through the recipient's inbox and the sender's Sent Items.
            sh.sent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend([m, from].map(|mailbox| Sent {
                    key: Shared::sent_key(mailbox, &key),
                    mailbox,
                    secs,
                    unix_us,
                    after_close: false,
                    // A send no replica confirmed may or may not have gone out.
                    optional: closed.contains_key(&mailbox) || !sent,
                }));
            continue;
        }
        let key = match sh.dovecot_of(m) {
            None if sh.graph.is_some() => {
                let graph = sh.graph.as_deref().unwrap_or_default();
                let answer = post_json(
                    &sh.http,
                    &format!("{graph}/_control/users/{}/messages", Shared::email(m)),
                    &json!({ "from": "sender@harness.test", "subject": format!("harness {n}"), "body": body }),
                )
                .await?;
                n += 1;
                answer["internet_message_id"]
                    .as_str()
                    .with_context(|| {
                        format!("no internet_message_id in mock-graph's answer {answer}")
                    })?
                    .to_owned()
            }
            Some(dovecot) => {
                // Into the mailbox's Maildir, as a delivery agent puts it there, whether or
                // not the IMAP server is up.
                let id = format!("harness-{n}@harness.test");
                let to = Shared::email(m);
                let subject = format!("harness {n}");
                let text = imap_world::mail("sender@harness.test", &to, &subject, &id);
                dovecot.deliver_offline(&to, &text)?;
                n += 1;
                format!("<{id}>")
            }
            None => {
                let answer = post_json(
                    &sh.http,
                    &format!("{}/_control/mailboxes/{}/messages", sh.ews_of(m), Shared::email(m)),
                    &json!({ "from": "sender@harness.test", "subject": format!("harness {n}"), "body": body }),
                )
                .await?;
                n += 1;
                let key_field = if sh.operation == "NewEmail" {
                    "item_id"
                } else {
                    "message_id"
                };
                answer[key_field]
                    .as_str()
                    .with_context(|| format!("no {key_field} in mock-ews's answer {answer}"))?
                    .to_owned()
            }
        };
        let closed_at = sh
            .closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&m)
            .copied();
        sh.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Sent {
                key: Shared::sent_key(m, &key),
                mailbox: m,
                secs,
                unix_us,
                after_close: closed_at.is_some_and(|c| secs >= c + CLOSE_GRACE_SECS),
                optional: closed_at.is_some(),
            });
    }
}

/// Sends one mail from mailbox `from` to mailbox `to` as a Creatio user does, through the
/// running replicas in turn until one says it went out (an empty answer); every try carries
/// the same Message-ID. True when one did.
async fn send_through_listener(
    sh: &Shared,
    bases: &Bases,
    first: usize,
    from: usize,
    to: usize,
    message_id: &str,
    body: &str,
) -> bool {
    let command = json!({
        "Email": {
            "Id": message_id.trim_matches(['<', '>']),
            "Subject": format!("to {}", Shared::email(to)),
            "Body": body,
            "IsHtmlBody": false,
            "Sender": Shared::email(from),
            "Recepients": [Shared::email(to)],
            "CopyRecepients": [],
            "BlindCopyRecepients": [],
            "Headers": [],
            "Importance": 1,
            "Attachments": [],
            "MessageId": message_id,
        },
        "Attachments": null,
        "Credentials": sh.creds(from, &bases.creatio),
    });
    let up = sh.roster.up();
    for i in 0..up.len() {
        let (_, base) = &up[(first + i) % up.len()];
        let answer = async {
            let resp = sh
                .http
                .post(format!("{base}/apiv2/email/send"))
                .json(&command)
                .send()
                .await?;
            anyhow::Ok((resp.status(), resp.text().await?))
        };
        match answer.await {
            Ok((status, text)) if status.is_success() && text.is_empty() => return true,
            Ok((status, text)) => {
                eprintln!("send of {message_id} through {base}: {status} {text}");
            }
            Err(_) => {}
        }
    }
    false
}

/// Creatio's failover loop: asks `subscriptionsstate` for the open mailboxes and creates
/// again (Recreate) those that are not `exists`.
pub(super) async fn creatio_loop(
    sh: Shared,
    every: Duration,
    creatio_base: String,
    recreated: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        turn += 1;
        let open: Vec<usize> = {
            let closed = sh.closed.lock().unwrap_or_else(|p| p.into_inner());
            (0..sh.mailboxes)
                .filter(|m| !closed.contains_key(m))
                .collect()
        };
        let ids: Vec<String> = open.iter().map(|m| format!("mbx-{m}")).collect();
        let Ok(states) = sh
            .call_any(turn, "/api/listeners/subscriptionsstate", Some(&json!(ids)))
            .await
        else {
            continue;
        };
        let missing: Vec<Value> = open
            .iter()
            .filter(|m| states[format!("mbx-{m}")]["State"] != "exists")
            .map(|&m| sh.creds(m, &creatio_base))
            .collect();
        if !missing.is_empty()
            && sh
                .call_any(turn, "/api/listeners/recreate", Some(&json!(missing)))
                .await
                .is_ok()
        {
            recreated.fetch_add(missing.len(), Ordering::Relaxed);
        }
    }
}
