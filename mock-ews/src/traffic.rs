//! Generated traffic: batches of seeded mail, and mail at a steady rate for a while.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::mail::{InjectedMail, Rate, generated};
use crate::state::{ControlError, World};

/// Largest batch one call may ask for.
pub const MAX_BATCH: u64 = 100_000;

/// Delivers generated mails `first..first + count` of sequence `seed` to one mailbox.
pub(crate) fn batch(
    world: &World,
    mailbox: &str,
    seed: u64,
    first: u64,
    count: u64,
) -> Result<Vec<InjectedMail>, ControlError> {
    if count == 0 || count > MAX_BATCH {
        return Err(ControlError::Invalid {
            field: "count",
            reason: format!("must be between 1 and {MAX_BATCH}"),
        });
    }
    (first..first + count)
        .map(|n| world.inject(mailbox, generated(seed, n)))
        .collect()
}

/// Delivers mail at `rate` until its duration ends or `stop` fires; answers how many it
/// delivered. Mailboxes deleted meanwhile are skipped.
pub(crate) async fn at_rate(world: Arc<World>, rate: Rate, stop: CancellationToken) -> u64 {
    let targets = match &rate.mailbox {
        Some(m) => vec![m.clone()],
        None => world.mailbox_keys(),
    };
    if targets.is_empty() {
        return 0;
    }
    let mut pick = fastrand::Rng::with_seed(rate.seed);
    let period = Duration::from_secs_f64(1.0 / rate.per_second);
    let mut ticks = tokio::time::interval(period);
    let mut delivered = 0;
    for n in 0..rate.expected() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let target = &targets[pick.usize(..targets.len())];
        if world.inject(target, generated(rate.seed, n)).is_ok() {
            delivered += 1;
        }
    }
    delivered
}
