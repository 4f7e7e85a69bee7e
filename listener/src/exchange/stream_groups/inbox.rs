//! A shared stream's way to one member: an unbounded queue with one receiver.
//!
//! Every mailbox on a service account's shared streams holds one for as long as it streams,
//! so it is kept small: a channel of tokio's allocates a block of 32 slots up front (2.3 KiB
//! for a stream's message) and pads its ends to cache lines; this is one allocation of about
//! a hundred bytes, and its queue holds memory only while messages wait.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

struct State<T> {
    queue: VecDeque<T>,
    senders: usize,
    receiving: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes the receiver: a message, or the last sender gone.
    wake: Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pop(&self) -> Option<T> {
        let mut state = self.lock();
        let message = state.queue.pop_front();
        if state.queue.is_empty() && state.queue.capacity() > 0 {
            // Messages are few and far between: the queue holds nothing while they are.
            state.queue = VecDeque::new();
        }
        message
    }
}

/// Makes an inbox: its senders, cloned freely, and its one receiver.
pub fn inbox<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            senders: 1,
            receiving: true,
        }),
        wake: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `message`, or gives it back when the receiver is gone.
    pub fn send(&self, message: T) -> Result<(), T> {
        let mut state = self.shared.lock();
        if !state.receiving {
            return Err(message);
        }
        state.queue.push_back(message);
        drop(state);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// True once the receiver is gone.
    pub fn is_closed(&self) -> bool {
        !self.shared.lock().receiving
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        let last = state.senders == 0;
        drop(state);
        if last {
            self.shared.wake.notify_one();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next message; `None` once it is empty and every sender is gone.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            // A wake that came before this wait is kept by `Notify` as a permit.
            let woken = self.shared.wake.notified();
            match self.shared.pop() {
                Some(message) => return Some(message),
                None if self.shared.lock().senders == 0 => return None,
                None => woken.await,
            }
        }
    }

    /// The next message if one waits.
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<T> {
        self.shared.pop()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiving = false;
        // What was not taken goes back to nobody: senders see the receiver gone.
        let queue = std::mem::take(&mut state.queue);
        drop(state);
        drop(queue);
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_arrive_in_order_and_the_end_after_the_last_sender() {
        let (tx, mut rx) = inbox();
        let other = tx.clone();
        tx.send(1).unwrap();
        other.send(2).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        drop(other);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_message_sent_later() {
        let (tx, mut rx) = inbox();
        let waiting = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        tx.send("late").unwrap();
        assert_eq!(waiting.await.unwrap(), Some("late"));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_when_the_last_sender_goes() {
        let (tx, mut rx) = inbox::<u8>();
        let waiting = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(waiting.await.unwrap(), None);
    }

    #[test]
    fn a_gone_receiver_gives_messages_back() {
        let (tx, rx) = inbox();
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.send(7), Err(7));
    }

    #[test]
    fn an_empty_queue_holds_no_memory() {
        let (tx, mut rx) = inbox();
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(rx.try_recv(), Some(1));
        assert!(rx.shared.lock().queue.capacity() > 0);
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.shared.lock().queue.capacity(), 0);
        assert_eq!(rx.try_recv(), None);
    }
}
