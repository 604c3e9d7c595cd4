//! One order per communicator, and the host progress thread (API.md §7).
//!
//! Every operation on a communicator, blocking or asynchronous, takes a
//! ticket when it is issued and runs when `serving` reaches its ticket, so
//! operations run in the order they were issued. A blocking call whose
//! ticket is served at once (nothing queued or running) runs on the caller's
//! thread with two uncontended mutex operations of overhead and no system
//! call; one issued behind queued work sleeps until its turn, then also runs
//! on the caller's thread. Asynchronous work runs on one progress thread per
//! communicator, started at the first asynchronous call and stopped when the
//! communicator is dropped. Because only the holder of the current ticket
//! runs, a user-callback communicator never runs two callbacks at once.
//!
//! The progress thread sleeps on a condition variable while it has nothing
//! to run (no polling, no CPU). Collectives find their deadline when they
//! start (each backend's `Wait` is built at the start of the call), so the
//! deadline of queued work counts from when it starts running. Abort needs
//! nothing here: the communicator's abort flag makes every queued job fail
//! with ABORTED as soon as it starts, and unblocks the running one.

use super::Comm;
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One queued operation: the body, and where its status goes.
pub(crate) type JobFn = Box<dyn FnOnce() -> Result<()> + Send>;

struct Queued {
    ticket: u64,
    job: JobFn,
    work: Arc<WorkInner>,
}

#[derive(Default)]
struct State {
    /// The next ticket to hand out.
    next: u64,
    /// The ticket that may run now; every smaller one has finished.
    serving: u64,
    queue: VecDeque<Queued>,
    /// Callers sleeping until their ticket is served (or the queue drains).
    caller_waiters: usize,
    /// The progress thread sleeps on `thread_cv` (only then is it notified).
    thread_sleeping: bool,
    thread_started: bool,
    stop: bool,
}

struct Shared {
    id: u64,
    st: Mutex<State>,
    /// Wakes callers waiting for their turn or for the queue to drain.
    callers: Condvar,
    /// Wakes the progress thread.
    thread_cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ticket `serving` finished: let the next one run.
    fn advance(&self, st: &mut State) {
        st.serving += 1;
        if st.caller_waiters > 0 {
            self.callers.notify_all();
        }
        if st.thread_sleeping && st.queue.front().is_some_and(|q| q.ticket == st.serving) {
            self.thread_cv.notify_one();
        }
    }
}

thread_local! {
    /// Engines whose current ticket this thread holds (nested calls inside a
    /// turn, e.g. the collectives of one flat-param operation, run at once).
    static HELD: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

fn holds(id: u64) -> bool {
    HELD.with(|h| h.borrow().contains(&id))
}

fn hold(id: u64) {
    HELD.with(|h| h.borrow_mut().push(id));
}

fn release(id: u64) {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if let Some(i) = h.iter().rposition(|x| *x == id) {
            h.remove(i);
        }
    });
}

/// The order of one communicator's operations and its progress thread.
pub struct Engine {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Rank, for the thread name and log lines.
    rank: usize,
    /// Object ids (`Comm::next_object_id`).
    ids: AtomicU64,
}

/// The right to run now; dropping it lets the next operation run.
pub struct Turn<'a> {
    engine: Option<&'a Engine>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.engine {
            release(e.shared.id);
            let mut st = e.shared.lock();
            e.shared.advance(&mut st);
        }
    }
}

impl Engine {
    pub fn new(rank: usize) -> Engine {
        static IDS: AtomicU64 = AtomicU64::new(1);
        let shared =
            Arc::new(Shared { id: IDS.fetch_add(1, Ordering::Relaxed), st: Mutex::new(State::default()), callers: Condvar::new(), thread_cv: Condvar::new() });
        Engine { shared, thread: Mutex::new(None), rank, ids: AtomicU64::new(0) }
    }

    /// Wait until every operation issued before this one has finished, then
    /// hold the communicator until the returned guard is dropped. Inside a
    /// turn this thread already holds, returns at once.
    pub fn turn(&self) -> Turn<'_> {
        if holds(self.shared.id) {
            return Turn { engine: None };
        }
        let mut st = self.shared.lock();
        let t = st.next;
        st.next += 1;
        if st.serving != t {
            st.caller_waiters += 1;
            while st.serving != t {
                st = self.shared.callers.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.caller_waiters -= 1;
        }
        drop(st);
        hold(self.shared.id);
        Turn { engine: Some(self) }
    }

    /// Queue `job` behind everything issued so far; its status goes to the
    /// returned work. Starts the progress thread on first use.
    pub(crate) fn submit(&self, job: JobFn) -> Result<Work> {
        let work = Arc::new(WorkInner::new());
        let mut st = self.shared.lock();
        if !st.thread_started || st.stop {
            self.start_thread(&mut st)?;
        }
        let ticket = st.next;
        st.next += 1;
        st.queue.push_back(Queued { ticket, job, work: work.clone() });
        if st.thread_sleeping && st.serving == ticket {
            self.shared.thread_cv.notify_one();
        }
        Ok(Work { inner: work })
    }

    fn start_thread(&self, st: &mut State) -> Result<()> {
        let mut slot = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.take() {
            // A previous thread was told to stop (comm drained); it exits
            // once its queue is empty, which it is: we hold the lock it needs.
            st.stop = false;
            *slot = Some(old);
            return Ok(());
        }
        let shared = self.shared.clone();
        let h = std::thread::Builder::new()
            .name(format!("flatshard-r{}", self.rank))
            .spawn(move || progress_loop(shared))
            .map_err(|e| Error::io(format!("cannot start the communicator's progress thread: {e}")))?;
        *slot = Some(h);
        st.thread_started = true;
        st.stop = false;
        Ok(())
    }

    /// Wait until nothing is queued or running, at most `timeout`.
    /// True if drained.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        st.caller_waiters += 1;
        let done = loop {
            if st.serving == st.next {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            st = self.shared.callers.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        };
        st.caller_waiters -= 1;
        done
    }

    /// Is anything queued or running?
    pub fn busy(&self) -> bool {
        let st = self.shared.lock();
        st.serving != st.next
    }

    /// Does this communicator have a progress thread now?
    pub fn has_thread(&self) -> bool {
        self.thread.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Stop the progress thread once its queue is empty and join it (not
    /// when called on the progress thread itself: it then exits by itself).
    pub fn stop(&self) {
        let h = {
            let mut st = self.shared.lock();
            st.stop = true;
            self.shared.thread_cv.notify_one();
            self.thread.lock().unwrap_or_else(|p| p.into_inner()).take()
        };
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        let mut st = self.shared.lock();
        st.thread_started = false;
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn progress_loop(shared: Arc<Shared>) {
    let mut st = shared.lock();
    loop {
        if st.queue.front().is_some_and(|q| q.ticket == st.serving) {
            let Some(q) = st.queue.pop_front() else { continue };
            drop(st);
            hold(shared.id);
            let Queued { job, work, .. } = q;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).unwrap_or_else(|p| {
                let what =
                    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into());
                Err(Error::internal(format!("asynchronous operation panicked (a bug in flatshard, please report): {what}")))
            });
            // The job and what it captured are gone before the status is
            // published, so a waiter that then frees everything is the last owner.
            release(shared.id);
            work.complete(r);
            st = shared.lock();
            shared.advance(&mut st);
            continue;
        }
        if st.stop && st.queue.is_empty() {
            st.thread_started = false;
            return;
        }
        st.thread_sleeping = true;
        st = shared.thread_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        st.thread_sleeping = false;
    }
}

/// Where a work's status lands, shared by the queue, the handle and the
/// flat param that waits for it.
pub(crate) struct WorkInner {
    done: Mutex<Option<Result<()>>>,
    cv: Condvar,
    /// Has someone been told the status (a `wait`, or a flat-param call that
    /// returned the error)? A flat param reports a failure only once.
    observed: AtomicBool,
    /// NCCL work: the event recorded after it on the communicator's stream.
    device: Option<(crate::cuda::event::Event, Arc<Comm>)>,
}

impl WorkInner {
    fn new() -> WorkInner {
        WorkInner { done: Mutex::new(None), cv: Condvar::new(), observed: AtomicBool::new(false), device: None }
    }
    fn complete(&self, r: Result<()>) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cv.notify_all();
    }
}

/// Errors an asynchronous call reports itself (API §7) rather than through
/// its work: its arguments and the caller's state.
pub fn is_call_error(e: &Error) -> bool {
    matches!(e.kind, crate::error::ErrorKind::InvalidArgument | crate::error::ErrorKind::InvalidState | crate::error::ErrorKind::Unsupported)
}

/// One issued operation's status (the object behind `flatshard_work`).
#[derive(Clone)]
pub struct Work {
    inner: Arc<WorkInner>,
}

impl Work {
    /// Work that finished when it was issued (e.g. a staged NCCL call).
    pub fn finished(r: Result<()>) -> Work {
        let w = WorkInner::new();
        w.complete(r);
        Work { inner: Arc::new(w) }
    }

    /// NCCL work: done when the stream passes `event`.
    pub fn device(comm: Arc<Comm>, event: crate::cuda::event::Event) -> Work {
        let mut w = WorkInner::new();
        w.device = Some((event, comm));
        Work { inner: Arc::new(w) }
    }

    /// Block until the operation finished; its status (the same every time).
    pub fn wait(&self) -> Result<()> {
        let r = self.wait_quiet();
        self.inner.observed.store(true, Ordering::SeqCst);
        r
    }

    /// `wait` without counting as having reported the status.
    pub(crate) fn wait_quiet(&self) -> Result<()> {
        if let Some((ev, comm)) = &self.inner.device {
            let mut d = self.inner.done.lock().unwrap_or_else(|p| p.into_inner());
            if d.is_none() {
                *d = Some(comm.wait_event(ev));
            }
            return d.clone().unwrap_or(Ok(()));
        }
        let mut d = self.inner.done.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = d.as_ref() {
                return r.clone();
            }
            d = self.inner.cv.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The status if finished, without blocking.
    pub fn test(&self) -> Result<Option<Result<()>>> {
        if let Some((ev, _)) = &self.inner.device {
            let cached = self.inner.done.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if cached.is_some() {
                return Ok(cached);
            }
            // Finished on the stream: `wait` now returns at once (and picks
            // up asynchronous NCCL errors).
            return if ev.query()? { Ok(Some(self.wait())) } else { Ok(None) };
        }
        let r = self.inner.done.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if r.is_some() {
            self.inner.observed.store(true, Ordering::SeqCst);
        }
        Ok(r)
    }

    /// CUDA: make `stream` wait for the work without blocking the host; on
    /// host work this is `wait`.
    pub fn wait_stream(&self, stream: crate::cuda::Stream) -> Result<()> {
        match &self.inner.device {
            Some((ev, comm)) => {
                if comm.is_poisoned() {
                    return self.wait();
                }
                ev.stream_wait(stream)
            }
            None => self.wait(),
        }
    }

    /// Wait; Err only if the operation failed and nobody was told yet (a
    /// flat param returns an in-flight failure from the first call that
    /// waits for it, then behaves as after the failure).
    pub(crate) fn settle(&self) -> Result<()> {
        match self.wait_quiet() {
            Err(e) if !self.inner.observed.swap(true, Ordering::SeqCst) => Err(e),
            _ => Ok(()),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.inner.done.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl Comm {
    /// Hold the communicator for an operation made of several collectives
    /// (a flat-param call), behind everything issued before it.
    pub fn turn(&self) -> Turn<'_> {
        self.progress.turn()
    }

    /// Queue `job` on the progress thread, behind everything issued so far.
    /// ABORTED at once on a poisoned communicator.
    pub(crate) fn submit(&self, job: JobFn) -> Result<Work> {
        self.check_usable()?;
        self.progress.submit(job)
    }

    /// Issue one collective whose arguments were checked: it runs in the
    /// communicator's order, on the progress thread for host communicators;
    /// on NCCL ones at once (stream-ordered), followed by a CUDA event the
    /// work waits for.
    pub fn issue(self: &Arc<Self>, run: impl FnOnce(&Comm) -> Result<()> + Send + 'static) -> Result<Work> {
        self.check_usable()?;
        if self.is_device() {
            return match run(self) {
                Ok(()) => {
                    let dev = self.device_index().ok_or_else(|| Error::internal("NCCL communicator without a device"))?;
                    let ev = crate::cuda::event::Event::record(dev, self.stream())?;
                    Ok(Work::device(self.clone(), ev))
                }
                Err(e) if is_call_error(&e) => Err(e),
                Err(e) => Ok(Work::finished(Err(e))),
            };
        }
        let comm = self.clone();
        self.submit(Box::new(move || run(&comm)))
    }

    /// ABORTED if the communicator was aborted or poisoned.
    pub fn check_usable(&self) -> Result<()> {
        if self.is_poisoned() {
            return Err(Error::aborted(format!("rank {}: communicator unusable (aborted, or an earlier operation failed)", self.rank())));
        }
        Ok(())
    }

    /// `flatshard_comm_free`: wait at most the timeout for queued work, then
    /// abort what is left (it fails with ABORTED).
    pub fn drain_or_abort(&self) {
        let timeout = self.job_ctx().map_or(Duration::from_millis(600_000), |c| c.opts.timeout);
        if self.progress.busy() && !self.progress.drain(timeout) {
            crate::log::warn(self.rank(), "flatshard_comm_free: queued work did not finish within the timeout; aborting it");
            self.abort();
            self.progress.drain(Duration::from_secs(5));
        }
    }

    /// A number every rank gives the same object of this communicator when
    /// they create their objects in the same order (flat params).
    pub fn next_object_id(&self) -> u64 {
        self.progress.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Is the progress thread running (tests, diagnostics)?
    pub fn has_progress_thread(&self) -> bool {
        self.progress.has_thread()
    }

    /// NCCL: wait for a recorded event with the deadline (asynchronous
    /// errors reported, the communicator aborted on timeout).
    pub(crate) fn wait_event(&self, ev: &crate::cuda::event::Event) -> Result<()> {
        // Work that finished before a later failure poisoned the
        // communicator still reports success.
        if ev.query()? {
            return Ok(());
        }
        self.run(|b| {
            let d = b.device().ok_or_else(|| Error::internal("device work on a host communicator"))?;
            d.wait_event(ev)
        })
    }
}
