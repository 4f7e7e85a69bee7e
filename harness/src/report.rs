//! A run's report: the summary table printed at the end, `report.json`, and `latency.svg`
//! (each mail's latency against the time it was sent, the timeline's events marked).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use serde::Serialize;

use crate::scenario::Scenario;
use crate::stats::Percentiles;
use crate::verdict::{Event, Recovery, Sample, Verdict, Violation};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReplicaUsage {
    pub rss_mib: f64,
    /// Resident memory over the mailboxes it serves at the end (its fixed part included).
    pub kib_per_mailbox: Option<f64>,
    /// Percent of one core, from the replica's start to the end of the run.
    pub cpu_percent: f64,
}

/// What a run measured of its processes.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub replica_usage: BTreeMap<String, ReplicaUsage>,
    pub redis_commands: Vec<RedisWindow>,
}

/// Redis's work between two moments of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RedisWindow {
    pub from_secs: f64,
    pub to_secs: f64,
    /// What the window ends with (a step of the timeline, or the end of the mail).
    pub until: String,
    pub per_second: f64,
    /// The busiest commands, a second each.
    pub by_command: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    /// Where Redis ran, or the in-memory store.
    pub store: String,
    pub replicas_at_start: usize,
    pub mailboxes: usize,
    pub sent: usize,
    pub delivered: usize,
    pub lost: usize,
    /// Missing mail sent while mailboxes were unserved, where the scenario allows it.
    pub lost_while_unserved: usize,
    pub duplicated: usize,
    /// Posted again because the answer to an earlier post was cut; Creatio keeps one copy.
    pub reposted_after_cut_answer: usize,
    pub delivered_after_close: usize,
    pub latency_ms: Option<Percentiles>,
    /// The same, of the mail sent outside every disruption and the recovery from it (when
    /// the timeline has any).
    pub latency_ms_undisturbed: Option<Percentiles>,
    pub recoveries: Vec<Recovery>,
    /// Mailboxes per replica at the end.
    pub owners_at_end: BTreeMap<String, usize>,
    /// Mailboxes Creatio's failover loop created again.
    pub recreated_by_creatio_loop: usize,
    /// Each replica running at the end: resident memory then, and CPU over its life.
    pub replica_usage: BTreeMap<String, ReplicaUsage>,
    /// Redis's commands a second, between the start of the mail, each step of the timeline,
    /// and the end of the mail (runs on a Redis the harness can read).
    pub redis_commands: Vec<RedisWindow>,
    pub violations: Vec<Violation>,
    pub passed: bool,
    pub wall_secs: f64,
}

impl Report {
    pub fn new(
        scenario: &Scenario,
        store: &str,
        verdict: &Verdict,
        samples: &[Sample],
        recreated: usize,
        measured: Measured,
        wall_secs: f64,
    ) -> Report {
        Report {
            scenario: scenario.name.clone(),
            description: scenario.description.clone(),
            store: store.to_owned(),
            replicas_at_start: scenario.replicas.count,
            mailboxes: scenario.mailboxes.count,
            sent: verdict.sent,
            delivered: verdict.delivered,
            lost: verdict.lost,
            lost_while_unserved: verdict.lost_unserved,
            duplicated: verdict.duplicated,
            reposted_after_cut_answer: verdict.reposted,
            delivered_after_close: verdict.after_close,
            latency_ms: verdict.latency_ms,
            latency_ms_undisturbed: undisturbed(verdict),
            recoveries: verdict.recoveries.clone(),
            owners_at_end: samples.last().map(|s| s.owners.clone()).unwrap_or_default(),
            recreated_by_creatio_loop: recreated,
            replica_usage: measured.replica_usage,
            redis_commands: measured.redis_commands,
            violations: verdict.violations.clone(),
            passed: verdict.passed(),
            wall_secs,
        }
    }

    /// Writes `report.json` and `latency.svg` into `dir`.
    pub fn write(&self, dir: &Path, verdict: &Verdict, events: &[Event]) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("report.json"), json + "\n")?;
        chart(
            &dir.join("latency.svg"),
            &self.scenario,
            &verdict.latencies,
            events,
        )
        .context("drawing latency.svg")
    }

    /// The summary table, as printed after a run.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        out += &format!("\n{} — {verdict}\n  {}\n", self.scenario, self.description);
        out += &format!("  store           {}\n", self.store);
        out += &format!(
            "  mail            sent {}  delivered {}  lost {}  duplicated {}  after close {}\n",
            self.sent, self.delivered, self.lost, self.duplicated, self.delivered_after_close
        );
        if self.lost_while_unserved > 0 {
            out += &format!(
                "  allowed loss    {} mails sent while their mailboxes were unserved\n",
                self.lost_while_unserved
            );
        }
        if self.reposted_after_cut_answer > 0 {
            out += &format!(
                "  re-posted       {} mails whose first post's answer a cut lost (Creatio keeps one by Message-ID)\n",
                self.reposted_after_cut_answer
            );
        }
        if let Some(p) = &self.latency_ms {
            out += &format!(
                "  latency (ms)    p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}\n",
                p.p50, p.p90, p.p99, p.max
            );
        }
        if let Some(p) = &self.latency_ms_undisturbed {
            out += &format!(
                "  undisturbed     p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  (mail sent outside every disruption and its recovery)\n",
                p.p50, p.p90, p.p99, p.max
            );
        }
        for r in &self.recoveries {
            let took = r
                .recovery_secs
                .map_or("not settled before the next step".to_owned(), |t| {
                    format!("{t:.1} s")
                });
            out += &format!(
                "  at {:>6.1} s     {:<34} streaming again after {took}\n",
                r.secs, r.label
            );
        }
        let owners: Vec<String> = self
            .owners_at_end
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        out += &format!("  owners at end   {}\n", owners.join(", "));
        let usage: Vec<String> = self
            .replica_usage
            .iter()
            .map(|(r, u)| {
                let per = u
                    .kib_per_mailbox
                    .map_or(String::new(), |k| format!(" ({k:.1} KiB a mailbox)"));
                format!("{r} {:.1} MiB{per} {:.1}% CPU", u.rss_mib, u.cpu_percent)
            })
            .collect();
        if !usage.is_empty() {
            out += &format!("  replicas        {}\n", usage.join(", "));
        }
        for w in &self.redis_commands {
            let top: Vec<String> = w
                .by_command
                .iter()
                .take(5)
                .map(|(c, r)| format!("{c} {r:.0}"))
                .collect();
            out += &format!(
                "  Redis {:>5.0}-{:<5.0}s {:>7.0} commands/s until {} ({})\n",
                w.from_secs,
                w.to_secs,
                w.per_second,
                w.until,
                top.join(", ")
            );
        }
        if self.recreated_by_creatio_loop > 0 {
            out += &format!(
                "  Creatio's loop  created {} mailboxes again\n",
                self.recreated_by_creatio_loop
            );
        }
        for v in &self.violations {
            out += &format!("  VIOLATION {:<10} {}\n", v.rule, v.detail);
        }
        out
    }
}

/// Percentiles of the latency of mail sent outside every disruption and its recovery (a
/// second past it, or to the end where it never settled); `None` without disruptions.
fn undisturbed(verdict: &Verdict) -> Option<Percentiles> {
    if verdict.recoveries.is_empty() {
        return None;
    }
    let disturbed = |sent: f64| {
        verdict.recoveries.iter().any(|r| {
            sent >= r.secs
                && r.recovery_secs
                    .is_none_or(|took| sent <= r.secs + took + 1.0)
        })
    };
    let calm: Vec<f64> = verdict
        .latencies
        .iter()
        .filter(|(sent, _)| !disturbed(*sent))
        .map(|(_, ms)| *ms)
        .collect();
    Percentiles::of(&calm)
}

/// Latency of each mail against when it was sent, with the timeline's events as labelled
/// vertical lines.
fn chart(path: &Path, title: &str, points: &[(f64, f64)], events: &[Event]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = points
        .iter()
        .map(|(x, _)| *x)
        .chain(events.iter().map(|e| e.secs))
        .fold(1.0f64, f64::max)
        * 1.02;
    let y_max = points.iter().map(|(_, y)| *y).fold(10.0f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: latency from Exchange to Creatio"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds into the run (mail sent)")
        .y_desc("latency (ms)")
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart.draw_series(
        points
            .iter()
            .map(|(x, y)| Circle::new((*x, *y), 2, BLUE.mix(0.6).filled())),
    )?;
    for (i, e) in events.iter().enumerate() {
        let color = if e.disrupts { RED } else { BLACK };
        chart.draw_series(LineSeries::new(
            [(e.secs, 0.0), (e.secs, y_max)],
            color.mix(0.7).stroke_width(1),
        ))?;
        // Labels step down so neighbours do not overlap.
        let y = y_max * (0.95 - 0.07 * (i % 6) as f64);
        chart.draw_series(std::iter::once(Text::new(
            e.label.clone(),
            (e.secs, y),
            ("sans-serif", 12).into_font().color(&color),
        )))?;
    }
    root.present()?;
    Ok(())
}
