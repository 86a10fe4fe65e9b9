//! Work on untrusted input with bounded memory and time.
//!
//! A model file is hostile until proven otherwise: its chat template is a program (Jinja) that can loop or
//! build a string of any size, and a parser fed crafted bytes can be asked to allocate anything. Fuel and
//! output caps bound what a template *does*; this module bounds what it *holds*.
//!
//! The process's allocator is the system allocator plus a per-thread budget of live bytes. A thread with a
//! budget that would exceed it never gets the memory: it is parked for good (it sleeps, holding at most its
//! budget, and never runs again), and whoever waits for its result hears [`Bounded::Memory`]. Returning
//! null instead would abort the whole process, and an allocator must not unwind, so parking is the only
//! way to stop the work without losing the program. [`run_bounded`] runs a closure on such a thread with a
//! wall-clock limit as well; a thread over time is parked at its next allocation.
//!
//! The fuzz targets use [`Exceeded::Abort`] instead: an input that makes a parser ask for more than the
//! budget is a finding, reported and fatal.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The system allocator with per-thread budgets (see the module docs).
pub struct GuardedAlloc;

#[global_allocator]
static GLOBAL: GuardedAlloc = GuardedAlloc;

/// What happens to a thread that goes over its budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// Park the thread forever and raise its flag (see [`run_bounded`]).
    Park,
    /// Print the size asked for and abort the process (fuzzing: over budget is a bug).
    Abort,
}

/// Flags a budgeted thread shares with whoever waits for it. Leaked once and recycled, so the allocator
/// can reach them through a plain `&'static` without allocating.
#[derive(Default)]
struct Flags {
    /// The thread went over its memory budget (and is parked).
    over_budget: AtomicBool,
    /// The waiter gave up: park at the next allocation.
    stop: AtomicBool,
}

thread_local! {
    /// Budget in live bytes; 0: none.
    static LIMIT: Cell<usize> = const { Cell::new(0) };
    static USED: Cell<usize> = const { Cell::new(0) };
    static MODE: Cell<Exceeded> = const { Cell::new(Exceeded::Park) };
    static FLAGS: Cell<Option<&'static Flags>> = const { Cell::new(None) };
}

/// Largest single allocation request seen while a budget was set, process-wide (for the fuzz report).
static LARGEST_REQUEST: AtomicUsize = AtomicUsize::new(0);

/// Whether this thread may take `grow` more bytes; parks or aborts it when it may not.
#[inline]
fn admit(grow: usize) {
    let limit = LIMIT.try_with(Cell::get).unwrap_or(0);
    if limit == 0 {
        return;
    }
    LARGEST_REQUEST.fetch_max(grow, Ordering::Relaxed);
    let flags = FLAGS.try_with(Cell::get).ok().flatten();
    let used = USED.try_with(Cell::get).unwrap_or(0);
    let stop = flags.is_some_and(|f| f.stop.load(Ordering::Relaxed));
    if !stop && used.saturating_add(grow) <= limit {
        let _ = USED.try_with(|u| u.set(used + grow));
        return;
    }
    match MODE.try_with(Cell::get).unwrap_or(Exceeded::Park) {
        Exceeded::Abort => {
            use std::io::Write as _;
            // No allocation here: a fixed message and integers written through a stack buffer.
            let mut buf = [0u8; 160];
            let mut w = &mut buf[..];
            let _ = write!(
                w,
                "\nbounded: allocation of {grow} bytes with {used} live exceeds the budget of {limit} bytes\n"
            );
            let n = 160 - w.len();
            let _ = std::io::stderr().write_all(&buf[..n]);
            std::process::abort();
        }
        Exceeded::Park => {
            if let Some(f) = flags {
                f.over_budget.store(!stop, Ordering::SeqCst);
            }
            // Never returns: the work is abandoned, its memory (at most the budget) stays with it.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

#[inline]
fn release(shrink: usize) {
    if LIMIT.try_with(Cell::get).unwrap_or(0) != 0 {
        let _ = USED.try_with(|u| u.set(u.get().saturating_sub(shrink)));
    }
}

// SAFETY: every method forwards to `System` with the caller's layout and pointer unchanged; the
// bookkeeping around it touches only const-initialised thread-locals without destructors (no allocation,
// no re-entry) and atomics.
unsafe impl GlobalAlloc for GuardedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        admit(layout.size());
        // SAFETY: forwarded as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        admit(layout.size());
        // SAFETY: forwarded as given.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        release(layout.size());
        // SAFETY: forwarded as given.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            admit(new_size - layout.size());
        } else {
            release(layout.size() - new_size);
        }
        // SAFETY: forwarded as given.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Put the calling thread under a budget of `bytes` live bytes allocated from now on (0: lift it).
pub fn set_thread_budget(bytes: usize, mode: Exceeded) {
    let _ = USED.try_with(|u| u.set(0));
    let _ = MODE.try_with(|m| m.set(mode));
    let _ = LIMIT.try_with(|l| l.set(bytes));
}

/// Bytes the calling thread holds against its budget.
pub fn thread_bytes_used() -> usize {
    USED.try_with(Cell::get).unwrap_or(0)
}

/// The largest single allocation any budgeted thread asked for since the last call (and reset it).
pub fn take_largest_request() -> usize {
    LARGEST_REQUEST.swap(0, Ordering::Relaxed)
}

/// Why bounded work gave no result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bounded {
    /// It needed more than its memory budget.
    Memory { limit_bytes: usize },
    /// It ran longer than its time limit.
    Time { limit: Duration },
    /// It panicked.
    Panicked,
}

impl std::fmt::Display for Bounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bounded::Memory { limit_bytes } => {
                write!(f, "it needed more than {} MiB of memory", limit_bytes >> 20)
            }
            Bounded::Time { limit } => write!(f, "it ran longer than {:.0} s", limit.as_secs_f64()),
            Bounded::Panicked => write!(f, "it failed with an internal error"),
        }
    }
}

/// The machine's memory, where the OS says (Linux: `MemTotal` of `/proc/meminfo`).
pub fn total_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

thread_local! {
    /// Panics on this thread are being caught by [`catch_quietly`]: the hook stays silent.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Run `f`, catching a panic without the default hook's message on stderr (for third-party parsers that
/// panic on malformed input: the caller turns the panic into an error of its own).
pub fn catch_quietly<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        // Installing the hook allocates once for the process: not charged to a bounded thread's budget
        // (parked over its budget inside `call_once`, it would block every later caller for ever).
        let limit = LIMIT.try_with(|l| l.replace(0)).unwrap_or(0);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.try_with(Cell::get).unwrap_or(false) {
                previous(info);
            }
        }));
        let _ = LIMIT.try_with(|l| l.set(limit));
    });
    let was = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r
}

/// The message of a caught panic.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Largest text file read whole (evaluation and calibration text): 1 GiB is several hundred million tokens.
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// What is wrong with `path` as a predicate ("does not exist", "is a device, not a file", …), when it is not
/// a regular file or folder or cannot be looked at; `None` for a regular file or folder.
pub fn irregular(path: &std::path::Path) -> Option<String> {
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return Some(match e.kind() {
                std::io::ErrorKind::NotFound => match std::fs::symlink_metadata(path) {
                    Ok(_) => "is a broken symbolic link".into(),
                    Err(_) => "does not exist".into(),
                },
                _ if e.raw_os_error() == Some(40) => "is a symbolic-link loop".into(),
                _ => format!("cannot be read: {e}"),
            })
        }
    };
    let ft = m.file_type();
    if ft.is_file() || ft.is_dir() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if ft.is_fifo() {
            return Some("is a named pipe (FIFO), not a file".into());
        }
        if ft.is_char_device() || ft.is_block_device() {
            return Some("is a device, not a file".into());
        }
        if ft.is_socket() {
            return Some("is a socket, not a file".into());
        }
    }
    Some("is not a regular file or folder".into())
}

/// The bytes of the file `path`, refusing what is not a regular file (a FIFO would block, a device never
/// end) and files over `max` bytes, even ones that grow while read (`what` names it in errors).
pub fn read_capped(path: &std::path::Path, max: u64, what: &str) -> crate::Result<Vec<u8>> {
    use std::io::Read as _;
    let invalid = |m: String| crate::Error::Invalid(format!("{}: {m}", path.display()));
    if let Some(why) = irregular(path) {
        return Err(invalid(format!("the {what} {why}")));
    }
    if path.is_dir() {
        return Err(invalid(format!("the {what} is a folder; give a file")));
    }
    let file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    let mut buf = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| crate::Error::io(path, e))?;
    if buf.len() as u64 > max {
        return Err(invalid(format!(
            "the {what} is over {} MiB; give a smaller file",
            max >> 20
        )));
    }
    Ok(buf)
}

/// Read the UTF-8 text file `path` whole, through [`read_capped`].
pub fn read_text_file(path: &std::path::Path, max: u64, what: &str) -> crate::Result<String> {
    let invalid = |m: String| crate::Error::Invalid(format!("{}: {m}", path.display()));
    let buf = read_capped(path, max, what)?;
    String::from_utf8(buf).map_err(|e| {
        invalid(format!(
            "the {what} is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Flags of finished threads, for reuse.
static FREE_FLAGS: Mutex<Vec<&'static Flags>> = Mutex::new(Vec::new());

fn take_flags() -> &'static Flags {
    let reused = match FREE_FLAGS.lock() {
        Ok(mut v) => v.pop(),
        Err(p) => p.into_inner().pop(),
    };
    reused.unwrap_or_else(|| Box::leak(Box::default()))
}

fn give_back_flags(f: &'static Flags) {
    f.over_budget.store(false, Ordering::SeqCst);
    f.stop.store(false, Ordering::SeqCst);
    match FREE_FLAGS.lock() {
        Ok(mut v) => v.push(f),
        Err(p) => p.into_inner().push(f),
    }
}

/// Run `work` on a thread named `name` that may hold at most `max_bytes` of memory it allocates and
/// should finish within `max_time`. Its result, or why there is none. A thread that went over either limit
/// is abandoned (parked: see the module docs).
pub fn run_bounded<T: Send + 'static>(
    name: &str,
    max_bytes: usize,
    max_time: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Bounded> {
    let flags = take_flags();
    let (tx, rx) = crossbeam_channel::bounded::<std::thread::Result<T>>(1);
    let spawned = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = FLAGS.try_with(|f| f.set(Some(flags)));
            set_thread_budget(max_bytes, Exceeded::Park);
            let r = catch_quietly(work);
            // The result may be large; it leaves the budget with the thread.
            set_thread_budget(0, Exceeded::Park);
            let _ = tx.send(r);
        });
    if spawned.is_err() {
        give_back_flags(flags);
        return Err(Bounded::Panicked);
    }
    let start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(Ok(v)) => {
                give_back_flags(flags);
                return Ok(v);
            }
            Ok(Err(_)) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                give_back_flags(flags);
                return Err(Bounded::Panicked);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
        }
        if flags.over_budget.load(Ordering::SeqCst) {
            // The flags stay with the parked thread: never reused.
            return Err(Bounded::Memory {
                limit_bytes: max_bytes,
            });
        }
        if start.elapsed() > max_time {
            flags.stop.store(true, Ordering::SeqCst);
            return Err(Bounded::Time { limit: max_time });
        }
    }
}

/// Make the C allocator give large blocks back to the OS when they are freed. glibc raises its mmap
/// threshold each time a large block is freed (up to 32 MiB), after which blocks of that size come from the
/// heap and stay in the process when freed: a layer-by-layer job then grows with depth although it holds
/// only one layer (GPTQ on a 24-layer model kept ~40 MiB more than on a 4-layer one of the same width, all
/// of it freed memory). A fixed threshold of 128 KiB turns the adjustment off. Idempotent; a no-op off
/// glibc.
pub fn return_large_frees_to_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; it is called once, before the engine's
            // threads start allocating, and takes plain integers.
            #[allow(unsafe_code)]
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_within_budget_returns_its_result() {
        let r = run_bounded("bounded-test", 1 << 20, Duration::from_secs(10), || {
            let v = vec![7u8; 1000];
            v.iter().map(|&x| x as u32).sum::<u32>()
        });
        assert_eq!(r, Ok(7000));
    }

    #[test]
    fn doubling_a_string_is_stopped_at_the_budget() {
        let t = Instant::now();
        let r = run_bounded("bounded-test", 8 << 20, Duration::from_secs(30), || {
            let mut s = String::from("x");
            for _ in 0..60 {
                s = format!("{s}{s}");
            }
            s.len()
        });
        assert_eq!(
            r,
            Err(Bounded::Memory {
                limit_bytes: 8 << 20
            })
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_loop_that_allocates_is_stopped_at_the_time_limit() {
        let r = run_bounded(
            "bounded-test",
            8 << 20,
            Duration::from_millis(50),
            || loop {
                std::hint::black_box(vec![1u8; 16]);
            },
        );
        assert_eq!(
            r,
            Err(Bounded::Time {
                limit: Duration::from_millis(50)
            })
        );
    }

    #[test]
    fn memory_freed_is_given_back_to_the_budget() {
        // 100 × 1 MiB allocated and freed in turn fits a 4 MiB budget.
        let r = run_bounded("bounded-test", 4 << 20, Duration::from_secs(10), || {
            let mut n = 0usize;
            for _ in 0..100 {
                let v = std::hint::black_box(vec![1u8; 1 << 20]);
                n += v.len();
            }
            n
        });
        assert_eq!(r, Ok(100 << 20));
    }
}
