//! What a run recorded, judged: every invariant checked over the mail sent, the mail Creatio
//! recorded, and the listener's own account of its mailboxes sampled through the run. Pure
//! functions, so each rule is tested on records made up to break it.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::stats::Percentiles;

/// A mail the harness put in a mailbox.
#[derive(Debug, Clone, Serialize)]
pub struct Sent {
    /// What Creatio is sent that names it, after the mailbox it comes through
    /// (`mbx-3/<id@host>`): the Message-ID, or the item id for `NewEmail`.
    pub key: String,
    pub mailbox: usize,
    /// Seconds after the mail started.
    pub secs: f64,
    /// Wall clock, microseconds since the Unix epoch.
    pub unix_us: u64,
    /// The mailbox had been closed when the mail was sent: Creatio must not get it.
    pub after_close: bool,
    /// Its mailbox was closed around the time it was sent: Creatio may or may not get it.
    pub optional: bool,
}

impl Sent {
    /// The Message-ID (or item id) the key names, without the mailbox it came through.
    pub fn mail(&self) -> &str {
        self.key
            .strip_prefix("mbx-")
            .and_then(|k| k.split_once('/'))
            .map_or(self.key.as_str(), |(_, mail)| mail)
    }
}

/// A mail Creatio recorded.
#[derive(Debug, Clone, Serialize)]
pub struct Arrival {
    /// The mailbox it came through and the Message-ID (or item id), as [`Sent::key`].
    pub key: String,
    pub unix_us: u64,
}

/// What the listener said of its mailboxes at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub secs: f64,
    /// A replica answered `status`.
    pub answered: bool,
    pub streaming: usize,
    /// Mailboxes whose worker streams, as the running replicas count their own; `None` when
    /// one did not answer.
    pub workers_streaming: Option<usize>,
    pub failed: usize,
    /// Mailboxes per replica holding their lease.
    pub owners: BTreeMap<String, usize>,
    /// The replicas running then.
    pub up: Vec<String>,
    /// The mailboxes open then.
    pub open: usize,
}

impl Sample {
    /// Every open mailbox streams under exactly one live owner, with a worker.
    pub fn settled(&self) -> bool {
        self.answered
            && self.streaming == self.open
            && self.workers_streaming == Some(self.open)
            && self.owners.values().sum::<usize>() == self.open
            && self.owners.keys().all(|r| self.up.contains(r))
    }
}

/// A timeline entry, as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub secs: f64,
    pub label: String,
    pub disrupts: bool,
    /// It may cut Creatio's answer to a call Creatio already took (a replica killed, or the
    /// connections to Creatio reset): the mail is then posted again, as it must be.
    pub cuts_answers: bool,
}

/// A broken rule, and what broke it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub rule: &'static str,
    pub detail: String,
}

/// How long one disruption kept mailboxes from streaming under a live owner.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub secs: f64,
    pub label: String,
    /// `None` when the mailboxes had not settled before the next disruption.
    pub recovery_secs: Option<f64>,
}

/// What a run must show beyond the rules every run keeps.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub recovery_secs: f64,
    pub failed: usize,
    pub balanced: bool,
    /// Mail sent while a disruption kept mailboxes unserved may be missing (a replica on the
    /// in-memory store forgets its mailboxes when it restarts, and takes a new baseline when
    /// Creatio creates them again).
    pub unserved_loss: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub sent: usize,
    pub delivered: usize,
    pub lost: usize,
    /// Missing mail sent while its mailboxes were unserved, where that is allowed.
    pub lost_unserved: usize,
    pub duplicated: usize,
    /// Mail posted again because the answer to an earlier post was cut (Creatio keeps one copy
    /// by Message-ID); not a violation.
    pub reposted: usize,
    pub after_close: usize,
    pub latency_ms: Option<Percentiles>,
    /// (seconds after the start the mail was sent, milliseconds until Creatio had it).
    #[serde(skip)]
    pub latencies: Vec<(f64, f64)>,
    pub recoveries: Vec<Recovery>,
    pub violations: Vec<Violation>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// How long before a disruption a mail may still have been on its way through a replica.
const IN_FLIGHT_SECS: f64 = 1.0;

/// How long before a cut a copy Creatio took may have been waiting for its answer (the
/// post's answer, then the outcome's write to the store), and how long after it the cut may
/// have taken effect.
const ANSWER_CUT_BEFORE_SECS: f64 = 0.5;
const ANSWER_CUT_AFTER_SECS: f64 = 0.1;

/// Judges a run. `samples` are in time order; the last one is taken when the run settled.
pub fn judge(
    sent: &[Sent],
    arrivals: &[Arrival],
    samples: &[Sample],
    events: &[Event],
    bounds: Bounds,
) -> Verdict {
    let mut violations = Vec::new();
    let mut arrived: HashMap<&str, Vec<u64>> = HashMap::new();
    for a in arrivals {
        arrived.entry(&a.key).or_default().push(a.unix_us);
    }
    let known: HashMap<&str, &Sent> = sent.iter().map(|s| (s.key.as_str(), s)).collect();
    let recoveries = recoveries(samples, events);
    // A disruption leaves mailboxes unserved from a moment before it (mail already on its
    // way into a replica that died) until they settled, or until the next disruption.
    let unserved = |secs: f64| {
        bounds.unserved_loss
            && recoveries.iter().enumerate().any(|(i, r)| {
                let end = match r.recovery_secs {
                    Some(t) => r.secs + t,
                    None => recoveries.get(i + 1).map_or(f64::INFINITY, |n| n.secs),
                };
                secs >= r.secs - IN_FLIGHT_SECS && secs <= end
            })
    };
    // Arrivals are on the wall clock; events in seconds after the start.
    let start_us = sent
        .first()
        .map_or(0.0, |s| s.unix_us as f64 - s.secs * 1e6);
    let answer_cut = |unix_us: u64| {
        let secs = (unix_us as f64 - start_us) / 1e6;
        events.iter().any(|e| {
            e.cuts_answers
                && secs >= e.secs - ANSWER_CUT_BEFORE_SECS
                && secs <= e.secs + ANSWER_CUT_AFTER_SECS
        })
    };
    let (mut delivered, mut lost, mut duplicated, mut after_close) = (0, 0, 0, 0);
    let mut reposted = 0;
    let mut lost_unserved = 0;
    let mut latencies = Vec::new();
    for s in sent {
        let times = arrived.get(s.key.as_str()).map_or(&[][..], Vec::as_slice);
        if s.after_close {
            if !times.is_empty() {
                after_close += 1;
                violations.push(Violation {
                    rule: "closed",
                    detail: format!(
                        "mail {} to mbx-{} sent {:.1} s in, after the mailbox was closed, reached Creatio",
                        s.mail(), s.mailbox, s.secs
                    ),
                });
            }
            continue;
        }
        match times {
            [] if s.optional => {}
            [] if unserved(s.secs) => lost_unserved += 1,
            [] => {
                lost += 1;
                violations.push(Violation {
                    rule: "lost",
                    detail: format!(
                        "mail {} to mbx-{} sent {:.1} s in never reached Creatio",
                        s.mail(),
                        s.mailbox,
                        s.secs
                    ),
                });
            }
            [first, rest @ ..] => {
                delivered += 1;
                let first = rest.iter().fold(*first, |a, b| a.min(*b));
                latencies.push((s.secs, first.saturating_sub(s.unix_us) as f64 / 1000.0));
                let mut copies = times.to_vec();
                copies.sort_unstable();
                // Every copy but the last came just before a cut: each was posted again
                // because its answer never came back.
                let unanswered =
                    copies.len() > 1 && copies[..copies.len() - 1].iter().all(|&t| answer_cut(t));
                if unanswered {
                    reposted += 1;
                } else if !rest.is_empty() {
                    duplicated += 1;
                    violations.push(Violation {
                        rule: "duplicated",
                        detail: format!(
                            "mail {} to mbx-{} sent {:.1} s in reached Creatio {} times",
                            s.mail(),
                            s.mailbox,
                            s.secs,
                            times.len()
                        ),
                    });
                }
            }
        }
    }
    for key in arrived.keys().filter(|k| !known.contains_key(*k)) {
        violations.push(Violation {
            rule: "unknown",
            detail: format!("Creatio got mail {key}, which the harness never sent"),
        });
    }

    for r in &recoveries {
        match r.recovery_secs {
            Some(t) if t > bounds.recovery_secs => violations.push(Violation {
                rule: "recovery",
                detail: format!(
                    "after \"{}\" at {:.1} s the mailboxes took {t:.1} s to stream again under live owners (bound {:.1} s)",
                    r.label, r.secs, bounds.recovery_secs
                ),
            }),
            _ => {}
        }
    }
    match samples.last() {
        None => violations.push(Violation {
            rule: "settled",
            detail: "the listener was never asked how its mailboxes stand".into(),
        }),
        Some(last) if !last.settled() => violations.push(Violation {
            rule: "settled",
            detail: format!(
                "at the end {} of {} open mailboxes streamed, owners {:?}, live replicas {:?}",
                last.streaming, last.open, last.owners, last.up
            ),
        }),
        Some(last) => {
            if last.failed > bounds.failed {
                violations.push(Violation {
                    rule: "failed",
                    detail: format!(
                        "{} mailboxes ended Failed (allowed {})",
                        last.failed, bounds.failed
                    ),
                });
            }
            if bounds.balanced && !last.up.is_empty() {
                let mean = last.open as f64 / last.up.len() as f64;
                for r in &last.up {
                    let n = last.owners.get(r).copied().unwrap_or(0);
                    if n as f64 > mean + 1.0 {
                        violations.push(Violation {
                            rule: "balance",
                            detail: format!(
                                "replica {r} serves {n} mailboxes, more than one above the mean {mean:.1}"
                            ),
                        });
                    }
                }
            }
        }
    }
    let samples_ms: Vec<f64> = latencies.iter().map(|(_, ms)| *ms).collect();
    Verdict {
        sent: sent.len(),
        delivered,
        lost,
        lost_unserved,
        duplicated,
        reposted,
        after_close,
        latency_ms: Percentiles::of(&samples_ms),
        latencies,
        recoveries,
        violations,
    }
}

/// For each disruption: from its moment to the first settled sample after the last unsettled
/// one before the next disruption; zero when nothing became unsettled.
fn recoveries(samples: &[Sample], events: &[Event]) -> Vec<Recovery> {
    let disruptions: Vec<&Event> = events.iter().filter(|e| e.disrupts).collect();
    disruptions
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let until = disruptions.get(i + 1).map_or(f64::INFINITY, |n| n.secs);
            let window: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.secs >= e.secs && s.secs < until)
                .collect();
            let recovery_secs = match window.iter().rposition(|s| !s.settled()) {
                None => Some(0.0),
                Some(last_bad) => window[last_bad + 1..].first().map(|s| s.secs - e.secs),
            };
            Recovery {
                secs: e.secs,
                label: e.label.clone(),
                recovery_secs,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        recovery_secs: 5.0,
        failed: 0,
        balanced: true,
        unserved_loss: false,
    };

    fn sent(key: &str, mailbox: usize, secs: f64) -> Sent {
        Sent {
            key: key.into(),
            mailbox,
            secs,
            unix_us: (secs * 1e6) as u64,
            after_close: false,
            optional: false,
        }
    }

    fn arrival(key: &str, secs: f64) -> Arrival {
        Arrival {
            key: key.into(),
            unix_us: (secs * 1e6) as u64,
        }
    }

    fn sample(secs: f64, streaming: usize, owners: &[(&str, usize)], up: &[&str]) -> Sample {
        Sample {
            secs,
            answered: true,
            streaming,
            workers_streaming: Some(streaming),
            failed: 0,
            owners: owners.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
            up: up.iter().map(|r| r.to_string()).collect(),
            open: 4,
        }
    }

    fn settled(secs: f64) -> Sample {
        sample(secs, 4, &[("r0", 2), ("r1", 2)], &["r0", "r1"])
    }

    fn rules(v: &Verdict) -> Vec<&'static str> {
        v.violations.iter().map(|v| v.rule).collect()
    }

    #[test]
    fn a_clean_run_passes_and_measures_latency() {
        let v = judge(
            &[sent("a", 0, 1.0), sent("b", 1, 2.0)],
            &[arrival("a", 1.002), arrival("b", 2.010)],
            &[settled(0.0), settled(3.0)],
            &[],
            BOUNDS,
        );
        assert!(v.passed(), "{:?}", v.violations);
        assert_eq!((v.delivered, v.lost, v.duplicated), (2, 0, 0));
        let p = v.latency_ms.unwrap();
        assert!((p.max - 10.0).abs() < 0.01, "{p:?}");
    }

    #[test]
    fn a_lost_mail_and_a_duplicate_are_named() {
        let v = judge(
            &[sent("a", 0, 1.0), sent("b", 1, 2.0), sent("c", 2, 3.0)],
            &[arrival("a", 1.1), arrival("c", 3.1), arrival("c", 3.2)],
            &[settled(4.0)],
            &[],
            BOUNDS,
        );
        assert_eq!(rules(&v), ["lost", "duplicated"]);
        assert!(v.violations[0].detail.contains("mail b to mbx-1"));
        assert!(v.violations[1].detail.contains("mail c to mbx-2"));
        assert!(v.violations[1].detail.contains("2 times"));
        assert_eq!((v.delivered, v.lost, v.duplicated), (2, 1, 1));
    }

    #[test]
    fn a_copy_whose_answer_a_cut_may_have_lost_is_a_repost_and_no_other() {
        let reset = Event {
            secs: 10.0,
            label: "creatio link of all: reset".into(),
            disrupts: true,
            cuts_answers: true,
        };
        let mended = Event {
            secs: 12.0,
            label: "creatio link of all: pass".into(),
            disrupts: true,
            cuts_answers: false,
        };
        let events = [reset, mended];
        let mails = [
            sent("cut", 0, 9.9),
            sent("early", 1, 8.0),
            sent("later", 2, 12.0),
        ];
        let v = judge(
            &mails,
            &[
                // Taken just before the reset, its answer lost, posted again after.
                arrival("cut", 9.95),
                arrival("cut", 12.5),
                // Taken two seconds before the reset: its answer had long come back.
                arrival("early", 8.0),
                arrival("early", 12.6),
                // Taken twice around a change that cuts nothing.
                arrival("later", 12.01),
                arrival("later", 12.02),
            ],
            &[settled(13.0)],
            &events,
            BOUNDS,
        );
        assert_eq!(v.reposted, 1);
        assert_eq!(v.duplicated, 2);
        assert_eq!(rules(&v), ["duplicated", "duplicated"]);
        assert!(v.violations[0].detail.contains("mail early"));
        assert!(v.violations[1].detail.contains("mail later"));
    }

    #[test]
    fn mail_after_close_must_not_arrive_and_strangers_are_reported() {
        let mut late = sent("late", 3, 5.0);
        late.after_close = true;
        let mut unseen = sent("unseen", 3, 6.0);
        unseen.after_close = true;
        let mut maybe = sent("maybe", 3, 4.0);
        maybe.optional = true;
        let v = judge(
            &[late, unseen, maybe],
            &[arrival("late", 5.5), arrival("stranger", 6.0)],
            &[settled(7.0)],
            &[],
            BOUNDS,
        );
        assert_eq!(rules(&v), ["closed", "unknown"]);
        assert_eq!(v.lost, 0, "mail after a close is not expected");
    }

    #[test]
    fn recovery_is_timed_from_the_disruption_to_the_last_settling() {
        let kill = Event {
            secs: 10.0,
            label: "kill -9 r1".into(),
            disrupts: true,
            cuts_answers: true,
        };
        // The dead replica still holds leases at 10.5 and 11; at 12 one mailbox is not yet
        // streaming; at 13 all is well.
        let samples = [
            settled(9.0),
            settled(10.2),
            sample(10.5, 4, &[("r0", 2), ("r1", 2)], &["r0"]),
            sample(12.0, 3, &[("r0", 4)], &["r0"]),
            sample(13.0, 4, &[("r0", 4)], &["r0"]),
        ];
        let v = judge(&[], &[], &samples, std::slice::from_ref(&kill), BOUNDS);
        assert_eq!(v.recoveries[0].recovery_secs, Some(3.0));
        assert!(
            v.passed(),
            "one replica left with 4 of 4 is fine: {:?}",
            v.violations
        );

        let strict = Bounds {
            recovery_secs: 2.0,
            ..BOUNDS
        };
        let v = judge(&[], &[], &samples, &[kill], strict);
        assert!(rules(&v).contains(&"recovery"), "{:?}", v.violations);
    }

    #[test]
    fn mail_sent_while_unserved_may_be_missing_only_where_allowed() {
        let restart = Event {
            secs: 10.0,
            label: "kill -9 r0".into(),
            disrupts: true,
            cuts_answers: true,
        };
        let samples = [
            settled(9.0),
            sample(11.0, 0, &[], &["r0", "r1"]),
            settled(12.0),
        ];
        let mail = [sent("during", 0, 11.0), sent("after", 1, 13.0)];
        let v = judge(&mail, &[], &samples, std::slice::from_ref(&restart), BOUNDS);
        assert_eq!(rules(&v), ["lost", "lost"]);
        let lenient = Bounds {
            unserved_loss: true,
            ..BOUNDS
        };
        let v = judge(&mail, &[], &samples, &[restart], lenient);
        assert_eq!(rules(&v), ["lost"], "mail after the recovery still counts");
        assert!(v.violations[0].detail.contains("mail after"));
        assert_eq!((v.lost, v.lost_unserved), (1, 1));
    }

    #[test]
    fn an_unsettled_end_an_imbalance_and_failures_are_violations() {
        let v = judge(
            &[],
            &[],
            &[sample(1.0, 3, &[("r0", 4)], &["r0", "r1"])],
            &[],
            BOUNDS,
        );
        assert_eq!(rules(&v), ["settled"]);
        let lopsided = Sample {
            open: 6,
            ..sample(1.0, 6, &[("r0", 5), ("r1", 1)], &["r0", "r1"])
        };
        let v = judge(&[], &[], &[lopsided], &[], BOUNDS);
        assert_eq!(rules(&v), ["balance"]);
        let failing = Sample {
            failed: 1,
            ..settled(1.0)
        };
        let v = judge(&[], &[], &[failing], &[], BOUNDS);
        assert_eq!(rules(&v), ["failed"]);
        // The store says every mailbox streams, but one lease has no worker behind it.
        let hollow = Sample {
            workers_streaming: Some(3),
            ..settled(1.0)
        };
        let v = judge(&[], &[], &[hollow], &[], BOUNDS);
        assert_eq!(rules(&v), ["settled"]);
    }
}
