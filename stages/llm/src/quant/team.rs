//! The threads that share a block product's rows: the calling thread plus `threads - 1`
//! helpers. A decode step makes ~210 small products (a fraction of a millisecond each); with
//! a rayon pool the caller slept through each and woke a worker for it, and those two thread
//! switches per product took about a quarter of single-stream decode (perf: scheduler and
//! futex time). Here the caller works too, helpers spin briefly between products before they
//! park, and the caller never waits for a helper to wake: whatever no helper has claimed, it
//! runs itself. Tasks are claimed from a shared counter, so a task's result never depends on
//! which thread ran it.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{LlmError, Result};

/// How long an idle helper spins before it parks: longer than the gap between two products
/// of one decode step (attention, norms: tens of microseconds), far shorter than a step.
const SPIN: Duration = Duration::from_micros(200);

/// One product's tasks: `f(t)` for t in 0..tasks, each exactly once.
struct Job {
    /// The caller's closure with its lifetime erased. Dereferenced only for a claimed task
    /// (t < tasks), and the caller returns only after every task has completed, so never after
    /// the closure is gone.
    f: *const (dyn Fn(usize) + Sync + 'static),
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// The first task panic's payload, re-raised on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `f` points at a `Sync` closure and is only called while the caller keeps it alive
// (see `Job::f`); the rest are atomics.
#[allow(unsafe_code)]
unsafe impl Send for Job {}
#[allow(unsafe_code)]
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs tasks until none is left.
    fn work(&self) {
        loop {
            let t = self.next.fetch_add(1, Ordering::Relaxed);
            if t >= self.tasks {
                return;
            }
            #[allow(unsafe_code)]
            // SAFETY: t < tasks, so the caller is still waiting for this task (see `Job::f`).
            let f = unsafe { &*self.f };
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(t))) {
                lock(&self.panic).get_or_insert(payload);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

#[derive(Default)]
struct Shared {
    /// Bumped for every new job (and on shutdown).
    generation: AtomicUsize,
    current: Mutex<Option<Arc<Job>>>,
    /// Helpers parked on `wake`.
    parked: AtomicUsize,
    wake: Condvar,
    stop: AtomicBool,
}

/// The calling thread and its helpers.
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Team({} threads)", self.threads())
    }
}

impl Team {
    /// A team of `threads` (the caller and `threads - 1` helpers).
    pub fn new(threads: usize) -> Result<Self> {
        let mut team = Team {
            shared: Arc::new(Shared::default()),
            helpers: Vec::new(),
        };
        for i in 1..threads.max(1) {
            let s = Arc::clone(&team.shared);
            // On an error `team` drops here, which stops and joins the helpers already started.
            let h = std::thread::Builder::new()
                .name(format!("flag-qkernel-{i}"))
                .spawn(move || helper(&s))
                .map_err(|e| LlmError::Invalid(format!("kernel helper thread: {e}")))?;
            team.helpers.push(h);
        }
        Ok(team)
    }

    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f(t)` for every t in 0..tasks across the team; returns when all have run.
    /// Re-raises (after all tasks ran) the first panic of a task. Two callers at once are
    /// correct but share the helpers badly (each runs what no helper took): a team has one
    /// caller at a time in practice, the engine that owns it.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() || tasks <= 1 {
            (0..tasks).for_each(f);
            return;
        }
        #[allow(unsafe_code)]
        // SAFETY: only the lifetime is erased; this function returns only after every task
        // that dereferences `f` has completed (the wait below), see `Job::f`.
        let f: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        let job = Arc::new(Job {
            f,
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
        });
        *lock(&self.shared.current) = Some(Arc::clone(&job));
        // SeqCst on both sides (here and in `helper`): a helper about to park either sees this
        // generation or is counted in `parked` before this reads it.
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        if self.shared.parked.load(Ordering::SeqCst) > 0 {
            // Under the lock: a helper between its check and its wait cannot miss this.
            let _g = lock(&self.shared.current);
            self.shared.wake.notify_all();
        }
        job.work();
        // Only tasks a helper already claimed are left: each is running now. Spin, then yield,
        // in case that helper's core was taken from it.
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < tasks {
            spins = spins.saturating_add(1);
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        {
            let mut current = lock(&self.shared.current);
            if current.as_ref().is_some_and(|j| Arc::ptr_eq(j, &job)) {
                *current = None;
            }
        }
        if let Some(payload) = lock(&job.panic).take() {
            resume_unwind(payload);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::Release);
        {
            let _g = lock(&self.shared.current);
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn helper(s: &Shared) {
    // Generation 0 is the team's start, not a load here: a team dropped before this thread
    // first ran has already bumped it, and a load would wait for a bump that never comes
    // (regression: `products_on_a_team_equal_those_on_one_thread_bit_for_bit` hung in drop).
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let mut generation = s.generation.load(Ordering::Acquire);
        while generation == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let mut g = lock(&s.current);
                s.parked.fetch_add(1, Ordering::SeqCst);
                while s.generation.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst)
                {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.parked.fetch_sub(1, Ordering::AcqRel);
            }
            generation = s.generation.load(Ordering::Acquire);
        }
        seen = generation;
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        let job = lock(&s.current).clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task runs exactly once per call, over many calls with helpers spinning and
    /// parked, and a panicking task is reported to the caller.
    #[test]
    fn each_task_runs_once_and_panics_reach_the_caller() {
        let team = Team::new(3).unwrap();
        for round in 0..2000usize {
            let n = 1 + round % 37;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            team.run(n, &|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "round {round}"
            );
            if round % 500 == 0 {
                // Let the helpers park, then wake them with the next call.
                std::thread::sleep(SPIN * 3);
            }
        }
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(8, &|t| assert!(t != 5, "task 5 fails"));
        }));
        let payload = r.expect_err("the task's panic reaches the caller");
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("task 5 fails"), "{msg}");
        // The team still works after a panic.
        let sum = AtomicUsize::new(0);
        team.run(10, &|t| {
            sum.fetch_add(t, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
    }

    /// Regression: a team dropped before its helper thread first ran hung in `drop` (the
    /// helper waited for a generation after the one that told it to stop).
    #[test]
    fn a_team_dropped_at_once_stops_its_helpers() {
        for _ in 0..200 {
            let team = Team::new(3).unwrap();
            team.run(4, &|_| {});
            drop(team);
            drop(Team::new(2).unwrap());
        }
    }

    /// Two threads calling one team at once: every task of each call runs exactly once.
    #[test]
    fn two_callers_at_once_each_get_all_their_tasks() {
        let team = Team::new(2).unwrap();
        std::thread::scope(|s| {
            for caller in 0..2 {
                let team = &team;
                s.spawn(move || {
                    for round in 0..500usize {
                        let n = 1 + (round + caller) % 23;
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        team.run(n, &|t| {
                            hits[t].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                });
            }
        });
    }
}
