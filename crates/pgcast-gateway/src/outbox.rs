//! A connection's outgoing queue: the event frames the hub picked for it, bounded in bytes.
//!
//! The hub pushes (never waits); the connection task takes up to a batch at a time. A push
//! that would exceed the byte budget is not queued: the connection is evicted as slow instead
//! and closes itself with 4008 (the client resumes with `since`), so one stalled reader
//! never holds more than its budget nor delays anybody else. Every queue together is held to
//! a process-wide limit too ([`Total`]): past it, a connection that holds more than its share
//! is evicted the same way, so a burst to thousands of slow readers cannot exhaust memory. The hub evicts every subscribed
//! connection the same way when the listener's stream has a gap ([`Eviction::Gap`], 1001).
//!
//! Under fan-out this runs once per connection and event, so it is a plain queue under a
//! short lock plus one waker: the push that finds the queue empty wakes the task, and the
//! task takes a whole batch per lock (a channel would cost a permit, a list slot and a wake
//! check per frame).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::hub::Outbound;

/// Entries an empty queue keeps room for (a few KiB): what steady fan-out needs between two
/// writes, without reallocating.
const KEPT_CAPACITY: usize = 64;
/// A drained queue with room for more entries than this gives it back (down to
/// [`KEPT_CAPACITY`]); below it, a queue that fills and drains every few writes (a catch-up)
/// keeps its room instead of reallocating each time.
const SHRINK_ABOVE: usize = 512;

/// The queue, its cost in bytes, and whether its connection is gone.
#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Outbound>,
    /// Sum of [`Outbound::cost`] of `frames`.
    bytes: usize,
    /// The connection ended: pushes are dropped.
    closed: bool,
}

/// The memory of every connection's queue together, against a process-wide limit
/// (`outbound_bytes_total`): [`ENTRY_BYTES`] per queued entry. The frames the entries point to
/// are not counted: one frame is shared by every recipient of its event, so what a burst costs
/// the process is its entries (a per-connection budget still counts the frames, as what one
/// reader may pin). The hub adds what it queued once per event, each connection takes off what
/// it took (per batch) or dropped: no shared counter is touched per entry. Signed, because a
/// connection may take an entry before the hub added its event.
/// Kept in a Prometheus gauge (`pgcast_outbound_queued_bytes`, an atomic), so operators see it.
#[derive(Debug)]
pub(crate) struct Total {
    bytes: Gauge,
    limit: usize,
}

impl Total {
    /// A total of `limit` bytes, kept in `bytes`.
    pub(crate) fn new(limit: usize, bytes: Gauge) -> Self {
        Total { bytes, limit }
    }

    /// The hub queued `bytes` more.
    pub(crate) fn add(&self, bytes: usize) {
        self.bytes.inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    fn sub(&self, bytes: usize) {
        self.bytes.dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// While every queue together holds more than the limit, the part of it each of
    /// `recipients` may hold; `None` below it.
    pub(crate) fn share(&self, recipients: usize) -> Option<usize> {
        let held = self.bytes.get();
        (held > i64::try_from(self.limit).unwrap_or(i64::MAX))
            .then(|| self.limit / recipients.max(1))
    }

    #[cfg(test)]
    pub(crate) fn held(&self) -> i64 {
        self.bytes.get()
    }
}

/// What one queued entry costs the process (its frame is shared, see [`Total`]).
pub(crate) const ENTRY_BYTES: usize = std::mem::size_of::<Outbound>();

/// Why a connection's stream ended; the connection closes and its client resumes with
/// `since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Eviction {
    /// A push would have exceeded the byte budget, or its share of every queue's total while
    /// that is over its limit (close 4008).
    Slow,
    /// The listener's stream has a gap: the log was pruned past it, so whatever this
    /// connection follows missed events (close 1001; the resume gets `resync`).
    Gap,
}

/// What became of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// Over budget: not queued, and the connection is now evicted as slow.
    Overflow,
    /// The connection ended.
    Closed,
}

/// One connection's queue, shared by the hub (which pushes) and the connection task (which
/// takes).
#[derive(Debug)]
pub(crate) struct Outbox {
    queue: Mutex<Queue>,
    waker: AtomicWaker,
    /// The byte budget (`outbound_bytes`).
    budget_bytes: usize,
    /// What every queue holds together; this one takes off what it takes or drops.
    total: Arc<Total>,
    /// Cancelled when the connection is evicted ([`Outbox::eviction`] says why); it closes.
    pub(crate) evicted: CancellationToken,
    /// The first eviction's reason.
    eviction: OnceLock<Eviction>,
}

impl Outbox {
    pub(crate) fn new(budget_bytes: usize, total: Arc<Total>) -> Self {
        Outbox {
            queue: Mutex::default(),
            waker: AtomicWaker::new(),
            budget_bytes,
            total,
            evicted: CancellationToken::new(),
            eviction: OnceLock::new(),
        }
    }

    /// Ends this connection's stream (the first reason stays). True if this call evicted it.
    pub(crate) fn evict(&self, why: Eviction) -> bool {
        // Set before the cancel: whoever sees the token cancelled finds the reason.
        let first = self.eviction.set(why).is_ok();
        self.evicted.cancel();
        first
    }

    /// Why the connection was evicted, if it was.
    pub(crate) fn eviction(&self) -> Option<Eviction> {
        self.eviction.get().copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `out` unless that would exceed the budget, or `share` when every queue together
    /// is over its limit ([`Total::share`]) and this one is not empty; then the connection is
    /// declared evicted as slow. Never waits. The caller adds what was queued to the [`Total`].
    pub(crate) fn push(&self, out: Outbound, share: Option<usize>) -> Pushed {
        let cost = out.cost();
        let mut queue = self.lock();
        if queue.closed {
            return Pushed::Closed;
        }
        // A share never refuses an empty queue: its reader keeps up.
        let over_share = share.is_some_and(|share| {
            !queue.frames.is_empty() && (queue.frames.len() + 1) * ENTRY_BYTES > share
        });
        if over_share || queue.bytes + cost > self.budget_bytes {
            drop(queue);
            if !self.evicted.is_cancelled() {
                self.evict(Eviction::Slow);
            }
            return Pushed::Overflow;
        }
        let was_empty = queue.frames.is_empty();
        queue.bytes += cost;
        queue.frames.push_back(out);
        drop(queue);
        // A non-empty queue has a wake pending already: the task takes until it finds it
        // empty, and only then waits.
        if was_empty {
            self.waker.wake();
        }
        Pushed::Queued
    }

    /// Moves up to `max` queued frames, oldest first, into `into`; pending while none are
    /// queued. What is taken no longer counts against the budget.
    ///
    /// Each frame taken costs one unit of the task's cooperative budget, as a channel receive
    /// would: a connection with a deep queue yields its worker after about as many frames as
    /// tokio allows any task, instead of writing its whole backlog while a thousand others
    /// wait for their turn.
    pub(crate) fn poll_take(
        &self,
        cx: &mut Context<'_>,
        into: &mut Vec<Outbound>,
        max: usize,
    ) -> Poll<()> {
        let first = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let taken = match self.take(into, max) {
            0 => {
                self.waker.register(cx.waker());
                // A push between the first look and the registration woke nobody: look again.
                match self.take(into, max) {
                    0 => return Poll::Pending,
                    n => n,
                }
            }
            n => n,
        };
        first.made_progress();
        for _ in 1..taken {
            // Out of budget: the frames are taken, and the next poll yields first.
            match tokio::task::coop::poll_proceed(cx) {
                Poll::Ready(unit) => unit.made_progress(),
                Poll::Pending => break,
            }
        }
        Poll::Ready(())
    }

    /// Waits for frames and moves up to `max` of them into `into`.
    pub(crate) async fn take_batch(&self, into: &mut Vec<Outbound>, max: usize) {
        std::future::poll_fn(|cx| self.poll_take(cx, into, max)).await
    }

    /// Moves up to `max` frames into `into`; returns how many.
    fn take(&self, into: &mut Vec<Outbound>, max: usize) -> usize {
        let mut queue = self.lock();
        let n = queue.frames.len().min(max);
        if n == 0 {
            return 0;
        }
        let mut freed = 0;
        for out in queue.frames.drain(..n) {
            freed += out.cost();
            into.push(out);
        }
        queue.bytes -= freed;
        // A burst (a 10,000-row transaction) grows the queue to thousands of entries; kept,
        // that capacity would stay with the connection for its whole life, on every connection
        // the burst reached. Given back once the burst is written.
        if queue.frames.is_empty() && queue.frames.capacity() > SHRINK_ABOVE {
            queue.frames.shrink_to(KEPT_CAPACITY);
        }
        drop(queue);
        // Once per batch, outside the lock the hub pushes through.
        self.total.sub(n * ENTRY_BYTES);
        n
    }

    /// The connection ended: what is queued is dropped, and so is every later push.
    pub(crate) fn close(&self) {
        let mut queue = self.lock();
        queue.closed = true;
        self.total.sub(queue.frames.len() * ENTRY_BYTES);
        queue.bytes = 0;
        queue.frames = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::Utf8Bytes;
    use futures::task::noop_waker_ref;

    /// An outbox with `budget`, under a total without limit.
    fn unlimited(budget: usize) -> Outbox {
        Outbox::new(budget, Arc::new(Total::new(usize::MAX, Gauge::default())))
    }

    fn frame(position: i64, len: usize) -> Outbound {
        Outbound {
            sub: 1,
            position,
            committed_micros: 0,
            frame: Utf8Bytes::from("x".repeat(len)),
            membership: None,
        }
    }

    fn take_now(outbox: &Outbox, max: usize) -> Option<Vec<i64>> {
        let mut into = Vec::new();
        let mut cx = Context::from_waker(noop_waker_ref());
        match outbox.poll_take(&mut cx, &mut into, max) {
            Poll::Ready(()) => Some(into.iter().map(|o| o.position).collect()),
            Poll::Pending => None,
        }
    }

    #[test]
    fn takes_in_order_at_most_a_batch_and_frees_the_budget() {
        let cost = frame(0, 100).cost();
        let outbox = unlimited(cost * 3);
        for p in 1..=3 {
            assert_eq!(outbox.push(frame(p, 100), None), Pushed::Queued);
        }
        assert_eq!(take_now(&outbox, 2), Some(vec![1, 2]));
        // Two slots of budget are free again; the third frame is still queued.
        assert_eq!(outbox.push(frame(4, 100), None), Pushed::Queued);
        assert_eq!(outbox.push(frame(5, 100), None), Pushed::Queued);
        assert_eq!(take_now(&outbox, 10), Some(vec![3, 4, 5]));
        assert_eq!(take_now(&outbox, 10), None);
        assert!(!outbox.evicted.is_cancelled());
    }

    #[test]
    fn a_push_over_the_budget_is_dropped_and_declares_the_connection_slow() {
        let cost = frame(0, 100).cost();
        let outbox = unlimited(cost * 2);
        assert_eq!(outbox.push(frame(1, 100), None), Pushed::Queued);
        assert_eq!(outbox.push(frame(2, 100), None), Pushed::Queued);
        assert_eq!(outbox.push(frame(3, 100), None), Pushed::Overflow);
        assert!(outbox.evicted.is_cancelled());
        assert_eq!(outbox.eviction(), Some(Eviction::Slow));
        // What fitted is still there, in order; the overflowing frame is not.
        assert_eq!(take_now(&outbox, 10), Some(vec![1, 2]));
    }

    #[test]
    fn what_is_taken_or_dropped_leaves_the_total_and_a_share_is_a_limit() {
        let total = Arc::new(Total::new(6 * ENTRY_BYTES, Gauge::default()));
        let (a, b) = (
            Outbox::new(usize::MAX, total.clone()),
            Outbox::new(usize::MAX, total.clone()),
        );
        for p in 0..4 {
            assert_eq!(a.push(frame(p, 100), None), Pushed::Queued);
            assert_eq!(b.push(frame(p, 100), None), Pushed::Queued);
        }
        total.add(8 * ENTRY_BYTES); // what the hub adds once per event
        assert_eq!(total.held(), 8 * ENTRY_BYTES as i64);
        let share = total.share(2);
        assert_eq!(share, Some(3 * ENTRY_BYTES), "over its limit: half each");
        // A share is a limit like the budget: b (four entries) may not queue a fifth.
        assert_eq!(b.push(frame(4, 100), share), Pushed::Overflow);
        assert_eq!(b.eviction(), Some(Eviction::Slow));
        // But an empty queue is never refused for it.
        let c = Outbox::new(usize::MAX, total.clone());
        assert_eq!(c.push(frame(0, 1000), Some(1)), Pushed::Queued);
        total.add(ENTRY_BYTES);
        assert_eq!(c.eviction(), None);
        assert_eq!(c.push(frame(1, 10), Some(1)), Pushed::Overflow);
        c.close();
        assert_eq!(take_now(&a, 64).map(|t| t.len()), Some(4));
        b.close();
        assert_eq!(total.held(), 0, "taken and dropped bytes left the total");
        assert_eq!(total.share(2), None);
    }

    #[test]
    fn a_drained_burst_gives_its_room_back() {
        let outbox = unlimited(usize::MAX);
        for p in 0..5_000 {
            assert_eq!(outbox.push(frame(p, 10), None), Pushed::Queued);
        }
        assert!(outbox.lock().frames.capacity() >= 5_000);
        let mut taken = 0;
        while let Some(batch) = take_now(&outbox, 64) {
            taken += batch.len();
        }
        assert_eq!(taken, 5_000);
        assert!(outbox.lock().frames.capacity() <= KEPT_CAPACITY);
        // Traffic that fills it to a few hundred between writes keeps its room.
        for p in 0..300 {
            outbox.push(frame(p, 10), None);
        }
        let room = outbox.lock().frames.capacity();
        assert!(room >= 300);
        while take_now(&outbox, 64).is_some() {}
        assert_eq!(outbox.lock().frames.capacity(), room);
    }

    #[test]
    fn a_closed_outbox_drops_what_it_held_and_every_later_push() {
        let outbox = unlimited(1 << 20);
        outbox.push(frame(1, 10), None);
        outbox.close();
        assert_eq!(outbox.push(frame(2, 10), None), Pushed::Closed);
        assert_eq!(take_now(&outbox, 10), None);
        assert!(!outbox.evicted.is_cancelled());
    }

    #[tokio::test]
    async fn a_waiting_task_is_woken_by_the_push_that_finds_the_queue_empty() {
        let outbox = std::sync::Arc::new(unlimited(1 << 20));
        let taker = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let mut into = Vec::new();
                outbox.take_batch(&mut into, 8).await;
                into.iter().map(|o| o.position).collect::<Vec<_>>()
            })
        };
        // Whether the taker is already waiting or not, the push must reach it.
        outbox.push(frame(7, 10), None);
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), taker)
            .await
            .expect("the taker was never woken")
            .expect("the taker panicked");
        assert_eq!(got, vec![7]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_deep_queue_does_not_keep_its_taker_from_yielding() {
        const FRAMES: usize = 10_000;
        let outbox = std::sync::Arc::new(unlimited(usize::MAX));
        for p in 0..FRAMES as i64 {
            outbox.push(frame(p, 1), None);
        }
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let taker = {
            let (outbox, taken) = (outbox.clone(), taken.clone());
            tokio::spawn(async move {
                let mut into = Vec::new();
                while taken.load(std::sync::atomic::Ordering::Relaxed) < FRAMES {
                    outbox.take_batch(&mut into, 64).await;
                    taken.fetch_add(into.len(), std::sync::atomic::Ordering::Relaxed);
                    into.clear();
                }
            })
        };
        // On this single thread, the other task runs only when the taker yields.
        let other = tokio::spawn({
            let taken = taken.clone();
            async move { taken.load(std::sync::atomic::Ordering::Relaxed) }
        });
        let seen_by_other = other.await.expect("the other task panicked");
        taker.await.expect("the taker panicked");
        assert!(
            seen_by_other < FRAMES,
            "the taker wrote its whole backlog of {FRAMES} before anybody else ran"
        );
    }
}
