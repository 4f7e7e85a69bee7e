//! Which replica should serve each mailbox: rendezvous (highest-random-weight) hashing with
//! bounded load, sticky. Every replica computes the same answer from the same inputs, so each
//! claims only its own share; a replica that joins or leaves, and a mailbox created or
//! closed, moves only the mailboxes it must.
//!
//! Room is `min(cap, ceil(mailboxes / replicas))`, so once settled no replica serves more than
//! one above the mean, and none more than its cap. A mailbox a live replica serves stays there
//! while that replica has room (in id order); every other mailbox ranks the replicas by a hash
//! of (replica, mailbox) and goes to the first one that still has room.

use std::collections::HashMap;

/// The weight of `replica` for `mailbox`: stable across processes and versions.
fn weight(replica: &str, mailbox: &str) -> u64 {
    let mut input = Vec::with_capacity(replica.len() + mailbox.len() + 1);
    input.extend_from_slice(replica.as_bytes());
    input.push(0);
    input.extend_from_slice(mailbox.as_bytes());
    xxhash_rust::xxh3::xxh3_64(&input)
}

/// The replica for each mailbox. A mailbox is left out when every replica is full (more
/// mailboxes than the replicas' caps allow); it waits for room. Mailboxes a live replica
/// serves now (`served`) stay with it while it has room, so when room is short the ones that
/// wait are the ones no one serves, and a Create or a Close moves no other mailbox.
pub fn assign(
    replicas: &[String],
    mailboxes: &[String],
    cap: usize,
    served: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut assigned = HashMap::with_capacity(mailboxes.len());
    if replicas.is_empty() || cap == 0 {
        return assigned;
    }
    let room = mailboxes.len().div_ceil(replicas.len()).min(cap);
    let mut load = vec![0usize; replicas.len()];
    let mut order: Vec<&String> = mailboxes.iter().collect();
    order.sort();
    order.dedup();
    // Served mailboxes stay where they are while there is room.
    let mut unplaced = Vec::with_capacity(order.len());
    for mailbox in order {
        let owner = served
            .get(mailbox)
            .and_then(|o| replicas.iter().position(|r| r == o));
        match owner {
            Some(r) if load[r] < room => {
                load[r] += 1;
                assigned.insert(mailbox.clone(), replicas[r].clone());
            }
            _ => unplaced.push(mailbox),
        }
    }
    let mut ranked: Vec<usize> = (0..replicas.len()).collect();
    for mailbox in unplaced {
        ranked.sort_by_key(|&r| std::cmp::Reverse((weight(&replicas[r], mailbox), r)));
        if let Some(&r) = ranked.iter().find(|&&r| load[r] < room) {
            load[r] += 1;
            assigned.insert(mailbox.clone(), replicas[r].clone());
        }
    }
    assigned
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn loads(assigned: &HashMap<String, String>, replicas: &[String]) -> Vec<usize> {
        replicas
            .iter()
            .map(|r| assigned.values().filter(|v| *v == r).count())
            .collect()
    }

    #[test]
    fn three_replicas_take_fifty_each() {
        let replicas = names("replica-", 3);
        let assigned = assign(&replicas, &names("mbx-", 150), usize::MAX, &HashMap::new());
        assert_eq!(loads(&assigned, &replicas), [50, 50, 50]);
    }

    #[test]
    fn the_cap_leaves_the_rest_waiting() {
        let replicas = names("r", 2);
        let assigned = assign(&replicas, &names("m", 10), 3, &HashMap::new());
        assert_eq!(assigned.len(), 6);
        assert_eq!(loads(&assigned, &replicas), [3, 3]);
    }

    #[test]
    fn a_join_moves_about_its_share_and_no_more() {
        let mailboxes = names("mbx-", 3000);
        let before = assign(&names("r", 3), &mailboxes, usize::MAX, &HashMap::new());
        let after = assign(&names("r", 4), &mailboxes, usize::MAX, &HashMap::new());
        let moved = mailboxes.iter().filter(|m| before[*m] != after[*m]).count();
        // A quarter must move to the newcomer; bounded load may move a little more.
        assert!(
            (750..=1050).contains(&moved),
            "{moved} of 3000 moved when a fourth replica joined"
        );
        let to_newcomer = after.values().filter(|r| *r == "r3").count();
        assert_eq!(to_newcomer, 750);
    }

    #[test]
    fn a_leave_moves_only_the_leavers_mailboxes_when_there_is_room() {
        let mailboxes = names("mbx-", 300);
        let before = assign(&names("r", 3), &mailboxes, usize::MAX, &HashMap::new());
        let survivors = vec!["r0".to_owned(), "r2".to_owned()];
        let after = assign(&survivors, &mailboxes, usize::MAX, &HashMap::new());
        assert_eq!(loads(&after, &survivors), [150, 150]);
        let kept = mailboxes
            .iter()
            .filter(|m| before[*m] != "r1" && before[*m] == after[*m])
            .count();
        assert!(kept >= 150, "only {kept} of 200 stayed where they were");
    }

    #[test]
    fn when_room_is_short_the_served_mailboxes_keep_their_places() {
        // One replica left, room for one: of two mailboxes, the one it serves stays.
        let replicas = vec!["r1".to_owned()];
        let mailboxes = names("mbx-", 2);
        for served in ["mbx-0", "mbx-1"] {
            let now = HashMap::from([
                (served.to_owned(), "r1".to_owned()),
                ("other".to_owned(), "r0".to_owned()),
            ]);
            let assigned = assign(&replicas, &mailboxes, 1, &now);
            assert_eq!(assigned.len(), 1);
            assert_eq!(assigned.get(served).map(String::as_str), Some("r1"));
        }
    }

    proptest! {
        #[test]
        fn a_create_or_a_close_moves_no_other_mailbox_beyond_what_the_room_forces(
            replicas in 1usize..12, mailboxes in 1usize..400, pick in 0usize..400,
        ) {
            let replicas = names("replica-", replicas);
            let mailboxes = names("m", mailboxes);
            let now = assign(&replicas, &mailboxes, usize::MAX, &HashMap::new());
            // A Create: every other mailbox stays.
            let mut more = mailboxes.clone();
            more.push("created".into());
            let after = assign(&replicas, &more, usize::MAX, &now);
            for (m, r) in &now {
                prop_assert_eq!(after.get(m), Some(r));
            }
            // A Close: a mailbox moves only off a replica above the new room.
            let closed = &mailboxes[pick % mailboxes.len()];
            let fewer: Vec<String> = mailboxes.iter().filter(|m| *m != closed).cloned().collect();
            let after = assign(&replicas, &fewer, usize::MAX, &now);
            let room = fewer.len().div_ceil(replicas.len());
            let over = loads(&now, &replicas).iter().filter(|&&l| l > room).count();
            let moved = fewer.iter().filter(|m| after.get(*m) != now.get(*m)).count();
            prop_assert!(moved <= over, "{} moved, {} replicas above the room", moved, over);
        }

        #[test]
        fn every_mailbox_is_served_within_one_of_the_mean_by_any_replica_set(
            replicas in 1usize..12, mailboxes in 0usize..400,
        ) {
            let replicas = names("replica-", replicas);
            let mailboxes = names("m", mailboxes);
            let assigned = assign(&replicas, &mailboxes, usize::MAX, &HashMap::new());
            prop_assert_eq!(assigned.len(), mailboxes.len());
            let ceiling = mailboxes.len().div_ceil(replicas.len());
            for load in loads(&assigned, &replicas) {
                prop_assert!(load <= ceiling);
            }
            // The order replicas are listed in changes nothing.
            let mut reversed = replicas.clone();
            reversed.reverse();
            prop_assert_eq!(assign(&reversed, &mailboxes, usize::MAX, &HashMap::new()), assigned);
        }
    }
}
