//! A small pool of spinning worker threads for a forward pass's parallel steps.
//!
//! Decoding one token runs hundreds of matrix-vector products of a few microseconds each. Rayon's workers
//! fall asleep between them and each wake-up costs a futex call and a scheduling delay, which on a small
//! model was a third of the decoding time. Here the workers keep polling for the next job for a short
//! while ([`SPIN`]) before they park, as llama.cpp's CPU thread pool does, so back-to-back jobs start at
//! once. A prompt's steps (the F16 and tile GEMMs, attention, activation quantization, SwiGLU) run here
//! too: with those on rayon, its workers computed while this pool's spun on after attention, three busy
//! threads on two cores (F16 prompts 8–10 % faster on one pool). The calling thread takes part in every
//! job. One job runs at a time; a caller that finds the pool busy (another engine job decoding
//! concurrently), or a thread count other than the pool's, gets rayon instead — the results are the same,
//! only the scheduling differs.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker polls before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// A job: `f(i)` for every task index `i < n`. The pointer is only dereferenced while the job's caller
/// waits in [`Pool::run`], which keeps the closure alive.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}

// SAFETY: the closure is `Sync`, and it is only called while the caller that owns it is blocked in `run`.
unsafe impl Send for Job {}

struct Shared {
    /// Bumped once per job; workers wait for it to change.
    epoch: AtomicU64,
    job: Mutex<Option<Job>>,
    /// The next task index to take.
    next: AtomicUsize,
    /// Workers still working on the current job.
    pending: AtomicUsize,
    /// A task panicked in a worker.
    panicked: AtomicBool,
    /// Workers parked on `wake`.
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

struct Pool {
    shared: Arc<Shared>,
    /// Threads taking part in a job, the caller included.
    threads: usize,
    /// Serialises jobs; `try_lock` failing means another caller is running one.
    busy: Mutex<()>,
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        for i in 1..threads {
            let s = Arc::clone(&shared);
            // Detached: the pool lives as long as the process.
            let spawned = std::thread::Builder::new()
                .name(format!("quant-spin-{i}"))
                .spawn(move || worker(&s));
            if spawned.is_err() {
                // Without its workers the pool would wait for ever: run everything on the caller.
                return Self {
                    shared,
                    threads: 1,
                    busy: Mutex::new(()),
                };
            }
        }
        Self {
            shared,
            threads,
            busy: Mutex::new(()),
        }
    }

    /// `f(i)` for every `i < n`, on the workers and the calling thread; returns when all are done.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        // SAFETY: erasing the closure's lifetime is sound because this function does not return before
        // every worker has finished with the job (`pending` reaches 0) and dropped its copy.
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        *lock(&s.job) = Some(Job { f, n });
        s.next.store(0, Ordering::SeqCst);
        s.pending.store(self.threads - 1, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = lock(&s.park);
            s.wake.notify_all();
        }
        // The caller works too; a panic here is held until the workers are done with the job.
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
            let i = s.next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            // SAFETY: see above; the closure outlives this call.
            unsafe { (*f)(i) };
        }));
        // Wait for the workers; yield now and then, so that a worker the OS preempted (more runnable
        // threads than cores) gets the core back instead of this thread spinning on it.
        let mut polls = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(256) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        *lock(&s.job) = None;
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a parallel task panicked on a worker thread");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // Poll for a new job, then park.
        let start = Instant::now();
        let mut polls = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::SeqCst);
            if e != seen {
                break e;
            }
            polls = polls.wrapping_add(1);
            if !polls.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            if start.elapsed() < SPIN {
                // Let other runnable threads (rayon's, another job's) have the core meanwhile.
                std::thread::yield_now();
                continue;
            }
            let mut g = lock(&s.park);
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen {
                g = s
                    .wake
                    .wait(g)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(g);
        };
        seen = epoch;
        let job = *lock(&s.job);
        if let Some(job) = job {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
                let i = s.next.fetch_add(1, Ordering::Relaxed);
                if i >= job.n {
                    break;
                }
                // SAFETY: the job's caller waits in `run` until `pending` reaches 0 below.
                unsafe { (*job.f)(i) };
            }));
            if r.is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// `QS_SPIN=0` in the environment leaves every job to rayon (to measure what the pool buys).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("QS_SPIN").map_or(true, |v| v != "0"))
}

/// `(0..n).map(f).collect()`, the calls spread as [`for_each`] spreads them.
pub fn map<T: Send>(n: usize, f: &(dyn Fn(usize) -> T + Sync)) -> Vec<T> {
    let slots: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    for_each(n, &|i| *lock(&slots[i]) = Some(f(i)));
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .expect("for_each ran every task")
        })
        .collect()
}

/// `f(i, chunk)` for every `chunk`-long piece of `v` (the last may be shorter), spread as [`for_each`]
/// spreads tasks.
pub fn for_each_chunk<T: Send>(v: &mut [T], chunk: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    let parts: Vec<Mutex<&mut [T]>> = v.chunks_mut(chunk.max(1)).map(Mutex::new).collect();
    for_each(parts.len(), &|i| f(i, &mut lock(&parts[i])));
}

/// A job's share of a [`for_each_group`]: its task count and its task body.
pub type Part<'a> = (usize, Box<dyn Fn(usize) + Sync + 'a>);

/// Every part's tasks in one job: task `i` of part `k` as `parts[k].1(i)`. Independent steps (the
/// matrix-vector products that read the same activations) then share one start and one end of the pool's
/// job, where each ends with a wait for its slowest task.
pub fn for_each_group(parts: &[Part<'_>]) {
    let mut starts = Vec::with_capacity(parts.len() + 1);
    let mut total = 0;
    for (n, _) in parts {
        starts.push(total);
        total += n;
    }
    for_each(total, &|i| {
        let k = starts.partition_point(|&s| s <= i) - 1;
        (parts[k].1)(i - starts[k]);
    });
}

/// `f(i)` for every `i < n` in parallel: on the spinning pool when it is free and sized for the current
/// rayon thread count, else with rayon.
pub fn for_each(n: usize, f: &(dyn Fn(usize) + Sync)) {
    let threads = rayon::current_num_threads();
    if n <= 1 || threads <= 1 {
        (0..n).for_each(f);
        return;
    }
    let pool = POOL.get_or_init(|| Pool::new(if enabled() { threads } else { 1 }));
    if pool.threads == threads {
        if let Ok(_busy) = pool.busy.try_lock() {
            pool.run(n, f);
            return;
        }
    }
    use rayon::prelude::*;
    (0..n).into_par_iter().for_each(f);
}

/// A slice that disjoint tasks write through: each task index owns the elements it is handed.
pub struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _life: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: tasks write disjoint elements (the contract of `set`), and `T: Send` moves between threads.
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub fn new(s: &'a mut [T]) -> Self {
        Self {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _life: std::marker::PhantomData,
        }
    }

    /// Write element `i`. Each index must be written by at most one task of a [`for_each`] job.
    #[inline]
    pub fn set(&self, i: usize, v: T) {
        assert!(i < self.len, "index {i} out of {}", self.len);
        // SAFETY: in bounds (checked), and no other task touches element `i` (the caller's contract);
        // the slice is borrowed mutably for `'a`, so nothing else reads it meanwhile.
        unsafe { self.ptr.add(i).write(v) };
    }

    /// Write elements `i..i + v.len()` (one bounds check and one copy, where element-wise writes would
    /// each reload a value just stored as a vector). The same contract as [`Disjoint::set`].
    #[inline]
    pub fn set_slice(&self, i: usize, v: &[T])
    where
        T: Copy,
    {
        assert!(
            i <= self.len && v.len() <= self.len - i,
            "range {i}..{} out of {}",
            i + v.len(),
            self.len
        );
        // SAFETY: in bounds (checked); the elements belong to this task (the caller's contract), and `v`
        // cannot overlap them (it is a shared borrow while the slice is borrowed mutably for `'a`).
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), self.ptr.add(i), v.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_runs_every_task_of_every_part_once() {
        let counts = [3usize, 0, 1, 17, 5];
        let hits: Vec<Vec<AtomicUsize>> = counts
            .iter()
            .map(|&n| (0..n).map(|_| AtomicUsize::new(0)).collect())
            .collect();
        let parts: Vec<Part> = counts
            .iter()
            .zip(&hits)
            .map(|(&n, h)| -> Part {
                (
                    n,
                    Box::new(move |i| {
                        h[i].fetch_add(1, Ordering::Relaxed);
                    }),
                )
            })
            .collect();
        for_each_group(&parts);
        for_each_group(&[]);
        for h in &hits {
            assert!(h.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn map_and_chunks_cover_every_index_in_order() {
        let squares = map(37, &|i| i * i);
        assert_eq!(squares, (0..37).map(|i| i * i).collect::<Vec<_>>());
        let mut v = vec![0usize; 103];
        for_each_chunk(&mut v, 10, &|i, c| {
            for (j, x) in c.iter_mut().enumerate() {
                *x = i * 10 + j;
            }
        });
        assert_eq!(v, (0..103).collect::<Vec<_>>());
    }

    #[test]
    fn every_task_runs_once_and_jobs_follow_each_other() {
        let pool = Pool::new(3);
        for n in [0usize, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
        // Workers park after the spin time and still wake for the next job.
        std::thread::sleep(SPIN * 3);
        let sum = AtomicUsize::new(0);
        pool.run(100, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, &|i| assert!(i != 40, "task 40"));
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(10, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn disjoint_writes_land() {
        let mut out = vec![0usize; 513];
        {
            let d = Disjoint::new(&mut out);
            for_each(513, &|i| d.set(i, i * 2));
        }
        assert!(out.iter().enumerate().all(|(i, &v)| v == 2 * i));
    }
}
