//! Every output the engine writes (GGUF files, Hugging Face folders, importance matrices) goes through one
//! guard, so nothing is ever lost and nothing half-written is left behind:
//!
//! * [`preflight`], before any work starts: the output is not one of the inputs (nor a folder holding one,
//!   nor an existing file inside an input folder); an existing output is replaced only when asked
//!   (`overwrite`); the folder is writable (a probe file is created and removed) and has room for the
//!   estimated size; leftovers of killed runs into the same place are removed.
//! * [`Staged`]: the output is written under `<name>.partial-<pid>` and renamed into place by
//!   [`Staged::commit`] (an existing output of the same kind is replaced only then, so a failure keeps
//!   it); dropped uncommitted (an error, a cancel, a panic) it removes what it wrote.
//! * Every staged path is registered, so a SIGINT/SIGTERM handler can remove them before the process
//!   exits ([`remove_all_staged`]); a run killed with SIGKILL leaves its temporary behind, which the next
//!   run into the same place removes (its process is gone).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{Error, Result};

/// A single file or a folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    File,
    Folder,
}

/// What is about to be written, and what it must not touch.
#[derive(Clone, Debug)]
pub struct OutputSpec {
    pub path: PathBuf,
    pub kind: OutputKind,
    /// Files or folders read by the job (the model, an imatrix, a calibration file).
    pub inputs: Vec<PathBuf>,
    /// Replace an existing output of the same kind.
    pub overwrite: bool,
    /// Bytes the output will take (0: unknown); checked against the free space.
    pub estimated_bytes: u64,
}

impl OutputSpec {
    pub fn new(path: impl Into<PathBuf>, kind: OutputKind) -> Self {
        Self {
            path: path.into(),
            kind,
            inputs: Vec::new(),
            overwrite: false,
            estimated_bytes: 0,
        }
    }

    /// A file output.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::new(path, OutputKind::File)
    }

    /// A folder output.
    pub fn folder(path: impl Into<PathBuf>) -> Self {
        Self::new(path, OutputKind::Folder)
    }

    pub fn input(mut self, p: impl Into<PathBuf>) -> Self {
        self.inputs.push(p.into());
        self
    }

    pub fn overwrite(mut self, yes: bool) -> Self {
        self.overwrite = yes;
        self
    }

    pub fn estimated_bytes(mut self, n: u64) -> Self {
        self.estimated_bytes = n;
        self
    }
}

/// Room kept free beyond the estimate.
const SPACE_MARGIN_BYTES: u64 = 16 << 20;

fn refuse(path: &Path, what: impl Into<String>) -> Error {
    Error::Invalid(format!("{}: {}", path.display(), what.into()))
}

/// `p` made absolute with its symbolic links resolved; for a path that does not exist yet, its nearest
/// existing ancestor resolved and the rest appended.
fn resolved(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_or_else(|_| p.to_path_buf(), |d| d.join(p))
    };
    let mut tail = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for t in tail.iter().rev() {
                out.push(t);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_owned());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// The folder an output goes into (created when missing) and its file name.
fn parent_and_name(path: &Path) -> Result<(PathBuf, std::ffi::OsString)> {
    let name = path
        .file_name()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .ok_or_else(|| refuse(path, "not a usable output name"))?
        .to_owned();
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    Ok((parent, name))
}

/// Check `spec` before any work starts (see the module docs); creates the output's folder when missing.
pub fn preflight(spec: &OutputSpec) -> Result<()> {
    let out = &spec.path;
    let (parent, name) = parent_and_name(out)?;
    let target = resolved(out);
    for input in &spec.inputs {
        let src = resolved(input);
        if src == target {
            return Err(refuse(
                out,
                "this is the input; choose another output (nothing was written)",
            ));
        }
        if src.starts_with(&target) {
            return Err(refuse(
                out,
                format!(
                    "this would replace a folder holding the input {}; choose another output",
                    input.display()
                ),
            ));
        }
        if src.is_dir() && target.starts_with(&src) && std::fs::symlink_metadata(out).is_ok() {
            return Err(refuse(
                out,
                format!(
                    "this would replace a file of the input folder {}; choose another output",
                    input.display()
                ),
            ));
        }
    }
    match std::fs::symlink_metadata(out) {
        Err(_) => {}
        Ok(m) => {
            let ft = m.file_type();
            let is_dir = out.is_dir();
            let empty_dir = is_dir && std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_none());
            match spec.kind {
                OutputKind::File if is_dir => {
                    return Err(refuse(
                        out,
                        "is a folder; the output is a file (give a file name)",
                    ))
                }
                OutputKind::Folder if !is_dir => {
                    return Err(refuse(
                        out,
                        "exists and is not a folder; the output is a folder",
                    ))
                }
                OutputKind::File if !(ft.is_file() || ft.is_symlink() && out.is_file()) => {
                    return Err(refuse(out, "exists and is not a regular file"))
                }
                _ => {}
            }
            if !spec.overwrite && !empty_dir {
                return Err(refuse(
                    out,
                    "already exists; pass --force (or confirm in the studio) to replace it",
                ));
            }
        }
    }
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    remove_stale(&parent, &name);
    // Writable: a probe file beside the output.
    let probe = temp_path(&parent, &name, "probe");
    std::fs::write(&probe, b"").map_err(|e| {
        Error::io(
            &parent,
            std::io::Error::new(e.kind(), format!("cannot write here: {e}")),
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    if spec.estimated_bytes > 0 {
        if let Ok(free) = fs4::available_space(&parent) {
            let need = spec.estimated_bytes.saturating_add(SPACE_MARGIN_BYTES);
            if free < need {
                return Err(refuse(
                    out,
                    format!(
                        "not enough free space: the output needs about {}, {} is free there",
                        gib(need),
                        gib(free)
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn gib(n: u64) -> String {
    format!("{:.2} GiB", n as f64 / f64::from(1u32 << 30))
}

/// `<parent>/<name>.<tag>-<pid>`.
fn temp_path(parent: &Path, name: &std::ffi::OsStr, tag: &str) -> PathBuf {
    let mut n = name.to_owned();
    n.push(format!(".{tag}-{}", std::process::id()));
    parent.join(n)
}

/// Whether process `pid` is still running (where the system can tell; assumed so where it cannot).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc_root = Path::new("/proc");
    if proc_root.join("self").exists() {
        proc_root.join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Remove `<name>.partial-<pid>` / `.probe-<pid>` / `.old-<pid>` beside `name` left by processes that are
/// gone.
pub fn remove_stale(parent: &Path, name: &std::ffi::OsStr) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = format!("{}.", name.to_string_lossy());
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        let Some(rest) = n.strip_prefix(&prefix) else {
            continue;
        };
        let pid = ["partial-", "probe-", "old-"]
            .iter()
            .find_map(|t| rest.strip_prefix(t))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !process_alive(pid) {
                let p = e.path();
                let _ = if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
}

/// Temporaries being written by this process.
static STAGED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn registry() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    match STAGED.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn remove_path(p: &Path) {
    // A writer may still be creating files in a folder being removed: try a few times.
    for _ in 0..20 {
        let r = match std::fs::symlink_metadata(p) {
            Err(_) => return,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
            Ok(_) => std::fs::remove_file(p),
        };
        if r.is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Remove every temporary this process is writing (for a signal handler, just before exiting).
pub fn remove_all_staged() {
    let paths: Vec<PathBuf> = registry().clone();
    for p in &paths {
        remove_path(p);
    }
}

/// How many temporaries this process is writing.
pub fn staged_count() -> usize {
    registry().len()
}

/// An output being written (see the module docs).
#[derive(Debug)]
pub struct Staged {
    spec: OutputSpec,
    temp: PathBuf,
    done: bool,
}

impl Staged {
    /// Check `spec` ([`preflight`]) and start the temporary: an empty folder for a folder output, nothing
    /// yet for a file (the writer creates it at [`path`](Self::path)).
    pub fn begin(spec: OutputSpec) -> Result<Self> {
        preflight(&spec)?;
        let (parent, name) = parent_and_name(&spec.path)?;
        let temp = temp_path(&parent, &name, "partial");
        remove_path(&temp);
        registry().push(temp.clone());
        let staged = Self {
            spec,
            temp,
            done: false,
        };
        if staged.spec.kind == OutputKind::Folder {
            std::fs::create_dir(&staged.temp).map_err(|e| Error::io(&staged.temp, e))?;
        }
        Ok(staged)
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Where the output ends up.
    pub fn final_path(&self) -> &Path {
        &self.spec.path
    }

    /// Put the finished output in place (replacing an existing one only if the spec allows it).
    pub fn commit(mut self) -> Result<PathBuf> {
        let out = self.spec.path.clone();
        let io = |e| Error::io(&out, e);
        if self.spec.kind == OutputKind::File {
            if let Ok(f) = std::fs::File::open(&self.temp) {
                let _ = f.sync_all();
            }
        }
        match std::fs::symlink_metadata(&out) {
            Err(_) => std::fs::rename(&self.temp, &out).map_err(io)?,
            Ok(_) if self.spec.kind == OutputKind::File && self.spec.overwrite => {
                // rename(2) replaces a file atomically.
                std::fs::rename(&self.temp, &out).map_err(io)?;
            }
            Ok(_) if self.spec.kind == OutputKind::Folder => {
                let empty = std::fs::read_dir(&out).is_ok_and(|mut d| d.next().is_none());
                if empty {
                    std::fs::remove_dir(&out).map_err(io)?;
                    std::fs::rename(&self.temp, &out).map_err(io)?;
                } else if self.spec.overwrite {
                    // Move the old folder aside, the new one in, then delete the old one.
                    let (parent, name) = parent_and_name(&out)?;
                    let old = temp_path(&parent, &name, "old");
                    remove_path(&old);
                    std::fs::rename(&out, &old).map_err(io)?;
                    if let Err(e) = std::fs::rename(&self.temp, &out) {
                        let _ = std::fs::rename(&old, &out);
                        return Err(io(e));
                    }
                    remove_path(&old);
                } else {
                    return Err(refuse(&out, "appeared while it was being written; kept it"));
                }
            }
            Ok(_) => return Err(refuse(&out, "appeared while it was being written; kept it")),
        }
        self.done = true;
        self.unregister();
        Ok(out)
    }

    fn unregister(&self) {
        let mut r = registry();
        if let Some(i) = r.iter().position(|p| *p == self.temp) {
            r.swap_remove(i);
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            remove_path(&self.temp);
            self.unregister();
        }
    }
}

/// Write an output through a [`Staged`] temporary: `write` fills the temporary path; the output is put in
/// place only when it succeeds.
pub fn write_staged(spec: OutputSpec, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let staged = Staged::begin(spec)?;
    write(staged.path())?;
    staged.commit()
}

/// `data` written to the file `spec.path` through a temporary.
pub fn write_bytes(spec: OutputSpec, data: &[u8]) -> Result<PathBuf> {
    write_staged(spec, |tmp| {
        std::fs::write(tmp, data).map_err(|e| Error::io(tmp, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        r.expect_err("must fail").to_string()
    }

    #[test]
    fn the_input_is_never_the_output() {
        let dir = tempfile::tempdir().expect("tmp");
        let m = dir.path().join("m.gguf");
        std::fs::write(&m, b"model").expect("write");
        // Same file, by another spelling and through a symlink, even with overwrite.
        let spellings = [
            m.clone(),
            dir.path().join(".").join("m.gguf"),
            dir.path().join("sub/../m.gguf"),
        ];
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        for out in spellings {
            let spec = OutputSpec::new(&out, OutputKind::File)
                .input(&m)
                .overwrite(true);
            assert!(
                err(preflight(&spec)).contains("this is the input"),
                "{out:?}"
            );
        }
        #[cfg(unix)]
        {
            let link = dir.path().join("link.gguf");
            std::os::unix::fs::symlink(&m, &link).expect("symlink");
            let spec = OutputSpec::new(&link, OutputKind::File)
                .input(&m)
                .overwrite(true);
            assert!(err(preflight(&spec)).contains("this is the input"));
        }
        assert_eq!(std::fs::read(&m).expect("read"), b"model");
    }

    #[test]
    fn a_folder_holding_the_input_or_a_file_inside_an_input_folder_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let model = dir.path().join("model");
        std::fs::create_dir(&model).expect("mkdir");
        std::fs::write(model.join("model.safetensors"), b"w").expect("write");
        let spec = OutputSpec::new(dir.path(), OutputKind::Folder)
            .input(&model)
            .overwrite(true);
        assert!(err(preflight(&spec)).contains("holding the input"));
        let spec = OutputSpec::new(model.join("model.safetensors"), OutputKind::File)
            .input(&model)
            .overwrite(true);
        assert!(err(preflight(&spec)).contains("a file of the input folder"));
        // A new file in the input folder is fine.
        let spec = OutputSpec::new(model.join("q4.gguf"), OutputKind::File).input(&model);
        preflight(&spec).expect("new file");
    }

    #[test]
    fn an_existing_output_is_replaced_only_when_asked_and_only_on_success() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("out.gguf");
        std::fs::write(&out, b"old").expect("write");
        let e = err(write_bytes(OutputSpec::new(&out, OutputKind::File), b"new"));
        assert!(e.contains("already exists; pass --force"), "{e}");
        assert_eq!(std::fs::read(&out).expect("read"), b"old");
        // A failing writer keeps the old file and leaves no temporary.
        let r = write_staged(
            OutputSpec::new(&out, OutputKind::File).overwrite(true),
            |tmp| {
                std::fs::write(tmp, b"half").expect("write");
                Err(Error::Cancelled)
            },
        );
        assert!(matches!(r, Err(Error::Cancelled)));
        assert_eq!(std::fs::read(&out).expect("read"), b"old");
        write_bytes(
            OutputSpec::new(&out, OutputKind::File).overwrite(true),
            b"new",
        )
        .expect("ok");
        assert_eq!(std::fs::read(&out).expect("read"), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.gguf")]);
    }

    #[test]
    fn folders_are_swapped_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("gptq");
        std::fs::create_dir(&out).expect("mkdir");
        std::fs::write(out.join("stale.bin"), b"x").expect("write");
        let spec = || OutputSpec::new(&out, OutputKind::Folder);
        assert!(err(write_staged(spec(), |_| Ok(()))).contains("already exists"));
        write_staged(spec().overwrite(true), |tmp| {
            std::fs::write(tmp.join("config.json"), b"{}").map_err(|e| Error::io(tmp, e))
        })
        .expect("swap");
        assert!(out.join("config.json").exists());
        assert!(!out.join("stale.bin").exists());
        // A file where a folder goes (and the reverse) is refused even with overwrite.
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").expect("write");
        let e = err(preflight(
            &OutputSpec::new(&f, OutputKind::Folder).overwrite(true),
        ));
        assert!(e.contains("not a folder"), "{e}");
        let e = err(preflight(
            &OutputSpec::new(&out, OutputKind::File).overwrite(true),
        ));
        assert!(e.contains("is a folder"), "{e}");
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        // pid 4194304 is above Linux's pid_max: never alive.
        let dead = dir.path().join("out.gguf.partial-4194304");
        let dead_dir = dir.path().join("out.gguf.old-4194304");
        let mine = dir
            .path()
            .join(format!("out.gguf.partial-{}", std::process::id()));
        let other = dir.path().join("other.gguf.partial-4194304");
        std::fs::write(&dead, b"x").expect("write");
        std::fs::create_dir(&dead_dir).expect("mkdir");
        std::fs::write(dead_dir.join("a"), b"x").expect("write");
        std::fs::write(&mine, b"x").expect("write");
        std::fs::write(&other, b"x").expect("write");
        preflight(&OutputSpec::new(
            dir.path().join("out.gguf"),
            OutputKind::File,
        ))
        .expect("ok");
        assert!(!dead.exists() && !dead_dir.exists());
        assert!(mine.exists() && other.exists());
    }

    #[test]
    fn not_enough_space_is_refused_up_front() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = OutputSpec::new(dir.path().join("big.gguf"), OutputKind::File)
            .estimated_bytes(u64::MAX / 2);
        let e = err(preflight(&spec));
        assert!(e.contains("not enough free space"), "{e}");
        assert!(std::fs::read_dir(dir.path()).expect("ls").next().is_none());
    }

    #[test]
    fn an_unwritable_place_is_refused_up_front() {
        let e = err(preflight(&OutputSpec::new(
            "/proc/quant-studio-test/out.gguf",
            OutputKind::File,
        )));
        assert!(e.contains("/proc"), "{e}");
    }
}
