//! Deadlines kept off the async runtime: one thread per process sleeps until the earliest
//! deadline and wakes the tasks waiting for it.
//!
//! Why not `tokio::time`: while any tokio timer is pending, every time a worker runs out of
//! work it sleeps in `epoll_wait` with a timeout, so the kernel arms and cancels a
//! high-resolution timer on each sleep. A tunnel always has a timer pending (its delayed
//! ACK, keepalive and silence deadlines), and a worker relaying request/response traffic
//! sleeps twice per exchange; on this project's virtual machines that cost 10–15 % of
//! the CPU of a round trip (`docs/BENCHMARKS.md`, 2026-12-05). With the long-lived
//! deadlines here instead, the workers sleep without a timeout, and this thread wakes only
//! when a deadline passes or an earlier one is set. Short-lived timeouts (a connect, a
//! handshake) stay on `tokio::time`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::locks::lock;

/// The waiting tasks, by (deadline, registration number).
#[derive(Default)]
struct Deadlines {
    waiting: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
}

/// The process's timer thread and what it waits for.
struct TimerThread {
    deadlines: Mutex<Deadlines>,
    /// Signalled when a deadline earlier than every other one is set.
    earlier: Condvar,
}

fn timers() -> &'static TimerThread {
    static TIMERS: OnceLock<&'static TimerThread> = OnceLock::new();
    TIMERS.get_or_init(|| {
        let timers: &'static TimerThread = Box::leak(Box::new(TimerThread {
            deadlines: Mutex::new(Deadlines::default()),
            earlier: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("halfpipe-timer".into())
            .spawn(move || timers.run())
            // Without it no deadline would ever pass: no tunnel could work.
            .expect("cannot start the timer thread");
        timers
    })
}

impl TimerThread {
    /// Wakes the tasks whose deadline passed, then sleeps until the next deadline.
    fn run(&self) {
        let mut due = Vec::new();
        let mut g = lock(&self.deadlines);
        loop {
            let now = Instant::now();
            while let Some(entry) = g.waiting.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            if !due.is_empty() {
                drop(g);
                due.drain(..).for_each(Waker::wake);
                g = lock(&self.deadlines);
                continue;
            }
            // A panic while holding the lock leaves the map consistent (every change is
            // one insert or remove), so a poisoned lock is used as it is.
            g = match g.waiting.first_key_value().map(|(k, _)| k.0) {
                None => self
                    .earlier
                    .wait(g)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(at) => {
                    self.earlier
                        .wait_timeout(g, at.saturating_duration_since(now))
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

/// Waits until `deadline` (see [`sleep_until`]).
pub struct Sleep {
    deadline: Instant,
    /// The registration while waiting: its key in [`Deadlines::waiting`].
    key: Option<(Instant, u64)>,
}

/// A future that is ready at `deadline`, timed by the process's timer thread.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        key: None,
    }
}

/// A future that is ready after `duration`.
pub fn sleep(duration: Duration) -> Sleep {
    sleep_until(Instant::now() + duration)
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            self.unregister();
            return Poll::Ready(());
        }
        let t = timers();
        let mut g = lock(&t.deadlines);
        match self.key {
            Some(key) => match g.waiting.get_mut(&key) {
                Some(w) => w.clone_from(cx.waker()),
                // Fired between the clock read and the lock: the wake is on its way, and
                // the deadline has passed.
                None => {
                    self.key = None;
                    return Poll::Ready(());
                }
            },
            None => {
                let key = (self.deadline, g.next_id);
                g.next_id += 1;
                let first = g.waiting.first_key_value().is_none_or(|(k, _)| key < *k);
                g.waiting.insert(key, cx.waker().clone());
                self.key = Some(key);
                if first {
                    t.earlier.notify_one();
                }
            }
        }
        Poll::Pending
    }
}

impl Sleep {
    fn unregister(&mut self) {
        if let Some(key) = self.key.take() {
            lock(&timers().deadlines).waiting.remove(&key);
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        self.unregister();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sleeps_end_at_their_deadlines_in_deadline_order() {
        let start = Instant::now();
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        // One task each, registered latest-first, so each new one is the earliest and
        // wakes the thread. The thread wakes due tasks in deadline order and this one-thread
        // runtime runs woken tasks in wake order, so the order holds however late it is.
        let tasks: Vec<_> = [60u64, 40, 20, 0]
            .into_iter()
            .map(|ms| {
                let order = order.clone();
                tokio::spawn(async move {
                    sleep(Duration::from_millis(ms)).await;
                    assert!(start.elapsed() >= Duration::from_millis(ms), "early");
                    order.lock().unwrap().push(ms);
                })
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("a sleep ended within 10 s")
                .unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 20, 40, 60]);
    }

    #[tokio::test]
    async fn a_dropped_sleep_leaves_nothing_behind_and_others_still_fire() {
        let long = sleep(Duration::from_secs(3600));
        let mut long = Box::pin(long);
        // Poll once so that it registers.
        assert!(futures_poll_once(long.as_mut()).await.is_pending());
        let key = long.key.expect("registered");
        assert!(lock(&timers().deadlines).waiting.contains_key(&key));
        drop(long);
        assert!(!lock(&timers().deadlines).waiting.contains_key(&key));
        // A bounded wait: the timer thread still serves.
        tokio::time::timeout(Duration::from_secs(5), sleep(Duration::from_millis(10)))
            .await
            .expect("a 10 ms sleep ended within 5 s");
    }

    /// Polls `f` once.
    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut f).poll(cx))).await
    }
}
