//! The runtime API, as HAProxy's stats socket: a Unix stream socket at
//! `STATE_DIR/IFACE.sock`, for root only (mode 0600, and the peer's uid is
//! checked), one JSON request per line and one JSON response per line.
//!
//! The socket task only carries requests: each goes over a channel, with a
//! one-shot reply, into the daemon's event loop, which handles it like any
//! other change (overrides → desired → reconcile → dataplane). The runtime
//! overrides themselves are kept in `STATE_DIR/IFACE.overrides.json`, so a
//! restarted controller (crash, upgrade, `systemctl restart`) keeps them; the
//! state directory is a tmpfs (`/run`), so a reboot starts from the file.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::IpAddr,
    os::{
        fd::AsRawFd as _,
        unix::{
            fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
            net::UnixStream as StdUnixStream,
        },
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{debug, warn};

use crate::desired::{BackendRef, Override, Overrides};

/// The longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Clients served at once; more are told to come back.
pub const MAX_CLIENTS: usize = 16;
/// How long a connection may take to send a request line, or to read a response.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest response a client reads.
const MAX_RESPONSE: u64 = 1 << 20;

/// One request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// `xdplb set weight`, `drain`, `maint`: replaces the backend's override.
    Set {
        vip: String,
        /// ADDRESS, or ADDRESS:PORT for a backend with a port of its own.
        backend: String,
        #[serde(rename = "override")]
        set: Override,
    },
    /// `xdplb ready`: the backend goes back to what the file says.
    Ready { vip: String, backend: String },
    /// `xdplb clear`: every override of `vip`, or every override at all.
    Clear { vip: Option<String> },
    /// `xdplb reload`: read the file again, validate and apply it.
    Reload,
    /// `xdplb drain` / `xdplb undrain` without a backend: the whole node.
    /// Drained, it announces no VIP (BGP routes withdrawn, keepalived's track
    /// file says fault) while its dataplane keeps forwarding what still comes.
    Node { drained: bool },
}

/// One response line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// Done; what is in force now, a line each.
    Done { lines: Vec<String> },
    /// The file was applied: its generation and what changed.
    Applied { generation: u64, changes: Vec<String> },
    /// The file was rejected, every error; `generation` keeps running.
    Rejected { generation: u64, errors: Vec<String> },
    /// Nothing was done: why (what was not found, and what exists).
    Error { error: String },
}

/// The largest weight an override may set (the file's limit too).
pub const MAX_WEIGHT: u32 = 65535;

/// A request and where its response goes.
pub type Call = (Request, oneshot::Sender<Response>);

pub fn socket_path(state_dir: &Path, iface: &str) -> PathBuf {
    state_dir.join(format!("{iface}.sock"))
}

pub fn overrides_path(state_dir: &Path, iface: &str) -> PathBuf {
    state_dir.join(format!("{iface}.overrides.json"))
}

/// The lock a controller of `iface` holds for its whole life.
pub fn lock_path(state_dir: &Path, iface: &str) -> PathBuf {
    state_dir.join(format!("{iface}.lock"))
}

/// Present while the node is drained (`xdplb drain`): kept across restarts
/// of the controller, gone with the state directory (a reboot).
pub fn drained_path(state_dir: &Path, iface: &str) -> PathBuf {
    state_dir.join(format!("{iface}.drained"))
}

/// Whether the node was left drained.
pub fn load_drained(state_dir: &Path, iface: &str) -> bool {
    drained_path(state_dir, iface).exists()
}

/// Keeps the node's drain for a restart.
pub fn save_drained(state_dir: &Path, iface: &str, drained: bool) -> Result<()> {
    let path = drained_path(state_dir, iface);
    if drained {
        let tmp = state_dir.join(format!(".{iface}.drained.{}.tmp", std::process::id()));
        crate::status::replace_file(&path, &tmp, b"drained by `xdplb drain`; `xdplb undrain` serves again\n")
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates the state directory if needed (0755) and refuses one that
/// another user could write to: whoever can write there can put their own
/// socket (or overrides) in place of xdplb's. A symlink is refused too:
/// whoever can change it decides where the socket goes.
pub fn check_state_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating the state directory {} failed", dir.display()))?;
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if meta.file_type().is_symlink() {
        bail!(
            "the state directory {} is a symlink: whoever can change it decides where the control socket goes; \
             fix: use the directory it points to (XDPLB_STATE_DIR or --state-dir)",
            dir.display()
        );
    }
    if !meta.is_dir() {
        bail!("the state directory {} is not a directory", dir.display());
    }
    let me = euid();
    if meta.uid() != me {
        bail!(
            "the state directory {} belongs to uid {}, not to xdplb's uid {me}: its owner could replace the \
             control socket; fix: chown {me} {}",
            dir.display(),
            meta.uid(),
            dir.display()
        );
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "the state directory {} is writable by other users (mode {mode:04o}): they could replace the \
             control socket; fix: chmod go-w {}",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// The listening socket; removed (and its task stopped) on drop.
pub struct Server {
    path: PathBuf,
    /// (device, inode) of the socket this server bound: only that one is removed.
    bound: (u64, u64),
    task: JoinHandle<()>,
    /// `STATE_DIR/IFACE.lock`, flocked: one controller per interface. Kept
    /// open (never removed) for the server's life; dropped after the socket goes.
    _lock: std::fs::File,
}

/// Takes `STATE_DIR/IFACE.lock` (flock, exclusive) and writes our pid into
/// it; names the holder if another controller has it.
fn lock(state_dir: &Path, iface: &str) -> Result<std::fs::File> {
    use std::io::{Seek as _, SeekFrom};
    let path = lock_path(state_dir, iface);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening the lock {} failed", path.display()))?;
    // SAFETY: flock on the open fd of `file`, which outlives the call; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(anyhow!(e).context(format!("locking {} failed", path.display())));
        }
        let mut text = String::new();
        file.read_to_string(&mut text).ok();
        let holder = match text.trim().parse::<u32>() {
            Ok(pid) => format!("pid {pid}"),
            Err(_) => "another process".to_string(),
        };
        bail!("another xdplb controller serves {iface}: {holder} holds the lock {}; stop it first", path.display());
    }
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing {} failed", path.display()))?;
    Ok(file)
}

impl Server {
    /// Listens on `STATE_DIR/IFACE.sock`, replacing a stale socket; refuses
    /// to start next to a controller that holds `STATE_DIR/IFACE.lock` or
    /// still answers on the socket. Requests come out of the receiver.
    pub fn start(state_dir: &Path, iface: &str) -> Result<(Self, mpsc::Receiver<Call>)> {
        check_state_dir(state_dir)?;
        // Held before anything else: of two controllers starting at once, the
        // second stops here, before it could touch the first one's socket.
        let lock = lock(state_dir, iface)?;
        let path = socket_path(state_dir, iface);
        match StdUnixStream::connect(&path) {
            Ok(_) => bail!(
                "another xdplb controller serves {iface}: its runtime API answers on {}; stop it first",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => {
                let meta = std::fs::symlink_metadata(&path)?;
                if !meta.file_type().is_socket() {
                    bail!("{} exists and is not a socket; remove it", path.display());
                }
                debug!("replacing the stale socket {}", path.display());
                std::fs::remove_file(&path).with_context(|| format!("removing {} failed", path.display()))?;
            }
        }
        // Bound under the umask 0177, so created 0600 (the chmod after only
        // makes sure), under another name, then renamed into place complete.
        let tmp = state_dir.join(format!(".{iface}.sock.{}", std::process::id()));
        std::fs::remove_file(&tmp).ok();
        // SAFETY: umask has no preconditions and cannot fail; the old mask is put back right after the bind.
        let old_mask = unsafe { libc::umask(0o177) };
        let bound = std::os::unix::net::UnixListener::bind(&tmp);
        // SAFETY: as above; restores the process's mask.
        unsafe { libc::umask(old_mask) };
        let listener = bound.with_context(|| format!("binding {} failed", tmp.display()))?;
        let ready = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::symlink_metadata(&tmp))
            .and_then(|m| std::fs::rename(&tmp, &path).map(|()| (m.dev(), m.ino())))
            .and_then(|id| listener.set_nonblocking(true).map(|()| id));
        let bound = match ready {
            Ok(id) => id,
            Err(e) => {
                std::fs::remove_file(&tmp).ok();
                return Err(anyhow!(e).context(format!("creating the runtime socket {} failed", path.display())));
            }
        };
        let listener = UnixListener::from_std(listener)?;
        let (tx, rx) = mpsc::channel(MAX_CLIENTS);
        let task = tokio::spawn(serve(listener, tx));
        Ok((Self { path, bound, task, _lock: lock }, rx))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        // Only our own socket: one put there since (by hand, say) is left alone.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.bound) {
            std::fs::remove_file(&self.path).ok();
        }
    }
}

async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                warn!("runtime API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let calls = calls.clone();
                tokio::spawn(async move {
                    client(stream, calls).await;
                    drop(slot);
                });
            }
            Err(_) => {
                let busy = format!("busy: {MAX_CLIENTS} clients are connected; try again");
                tokio::spawn(answer_once(stream, Response::Error { error: busy }));
            }
        }
    }
}

/// Reads the client's request line (unused), then sends `response` only:
/// closed with the request unread, the client's write could fail (EPIPE)
/// before it reads why.
async fn answer_once(mut stream: UnixStream, response: Response) {
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, async {
        let mut request = Vec::new();
        let _ = BufReader::new(&mut stream).take(MAX_REQUEST as u64 + 1).read_until(b'\n', &mut request).await;
        stream.write_all(&line(&response)).await
    })
    .await;
}

fn line(response: &Response) -> Vec<u8> {
    let mut text = serde_json::to_vec(response).unwrap_or_default();
    text.push(b'\n');
    text
}

/// One connection: request lines until EOF, each answered in turn.
async fn client(stream: UnixStream, calls: mpsc::Sender<Call>) {
    // The socket's mode already keeps others out; this holds even if it is changed.
    let me = euid();
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 || c.uid() == me => {}
        other => {
            let who = other.map_or("an unknown user".to_string(), |c| format!("uid {}", c.uid()));
            let whom = if me == 0 { "root (uid 0)".to_string() } else { format!("root and uid {me}") };
            let error = format!("permission denied: the runtime API is for {whom} only, not {who}");
            return answer_once(stream, Response::Error { error }).await;
        }
    }
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut request = Vec::new();
        let mut limited = (&mut read).take(MAX_REQUEST as u64 + 1);
        match tokio::time::timeout(CLIENT_TIMEOUT, limited.read_until(b'\n', &mut request)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
        let too_long = request.len() > MAX_REQUEST;
        let response = if too_long {
            Response::Error { error: format!("a request is one line of at most {MAX_REQUEST} bytes") }
        } else {
            match serde_json::from_slice::<Request>(&request) {
                Err(e) => Response::Error { error: format!("not a request: {e}") },
                Ok(Request::Set { set: Override::Weight(w), .. }) if w > MAX_WEIGHT => {
                    Response::Error { error: weight_error(w) }
                }
                Ok(r) => {
                    let (tx, rx) = oneshot::channel();
                    if calls.send((r, tx)).await.is_err() {
                        return;
                    }
                    rx.await.unwrap_or(Response::Error { error: "the controller is stopping".into() })
                }
            }
        };
        let sent = tokio::time::timeout(CLIENT_TIMEOUT, write.write_all(&line(&response))).await;
        if too_long || !matches!(sent, Ok(Ok(()))) {
            return;
        }
    }
}

fn weight_error(w: u32) -> String {
    format!("weight {w} is out of range: a weight is 0 (drain) to {MAX_WEIGHT}")
}

/// Whether the controller of `iface` has a runtime socket (a controller of an
/// older version has none: `xdplb reload` signals it instead).
pub fn has_socket(state_dir: &Path, iface: &str) -> bool {
    std::fs::symlink_metadata(socket_path(state_dir, iface)).is_ok_and(|m| m.file_type().is_socket())
}

/// Sends one request to the controller of `iface` and waits up to `timeout`
/// for its response.
pub fn call(state_dir: &Path, iface: &str, request: &Request, timeout: Duration) -> Result<Response> {
    let path = socket_path(state_dir, iface);
    let mut stream = StdUnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!(
            "no controller serves {iface}: {} does not exist (start it with `xdplb run`; `xdplb status` shows what runs)",
            path.display()
        ),
        std::io::ErrorKind::PermissionDenied => {
            anyhow!("permission denied on {}: the runtime API is for root only (use sudo)", path.display())
        }
        std::io::ErrorKind::ConnectionRefused => anyhow!(
            "no controller listens on {} (a stale socket: `xdplb run` for {iface} is not running)",
            path.display()
        ),
        _ => anyhow!(e).context(format!("connecting to {} failed", path.display())),
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut text = serde_json::to_vec(request)?;
    text.push(b'\n');
    // A controller that refuses the request may answer and close before it
    // is all sent: its answer (why) still counts over the write's error.
    let sent = stream.write_all(&text);
    let mut answer = String::new();
    let read = std::io::BufReader::new(stream.take(MAX_RESPONSE)).read_line(&mut answer);
    if let Err(e) = sent
        && answer.is_empty()
    {
        return Err(anyhow!(e).context(format!("sending to {} failed", path.display())));
    }
    read.with_context(|| format!("no answer from {} within {timeout:?}", path.display()))?;
    serde_json::from_str(&answer).with_context(|| format!("{} answered {answer:?}", path.display()))
}

/// One override as the overrides file keeps it.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    vip: String,
    address: IpAddr,
    /// 0: the backend has no port of its own.
    #[serde(default)]
    port: u16,
    #[serde(rename = "override")]
    set: Override,
}

/// The overrides a previous controller left; none when there is no file.
pub fn load_overrides(state_dir: &Path, iface: &str) -> Result<Overrides> {
    let path = overrides_path(state_dir, iface);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Overrides::new()),
        Err(e) => return Err(anyhow!(e).context(format!("reading {} failed", path.display()))),
    };
    let entries: Vec<Entry> =
        serde_json::from_slice(&text).with_context(|| format!("{} is not an overrides file", path.display()))?;
    if let Some(Entry { set: Override::Weight(w), .. }) =
        entries.iter().find(|e| matches!(e.set, Override::Weight(w) if w > MAX_WEIGHT))
    {
        bail!("{} is not a valid overrides file: {}", path.display(), weight_error(*w));
    }
    Ok(entries.into_iter().map(|e| (BackendRef { vip: e.vip, addr: e.address, port: e.port }, e.set)).collect())
}

/// Writes the overrides atomically; with none, removes the file.
pub fn save_overrides(state_dir: &Path, iface: &str, overrides: &Overrides) -> Result<()> {
    let path = overrides_path(state_dir, iface);
    if overrides.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(anyhow!(e).context(format!("removing {} failed", path.display())))
            }
            _ => Ok(()),
        };
    }
    let entries: Vec<Entry> =
        overrides.iter().map(|(b, o)| Entry { vip: b.vip.clone(), address: b.addr, port: b.port, set: *o }).collect();
    crate::status::replace_file(&path, &path.with_extension("json.tmp"), &serde_json::to_vec_pretty(&entries)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_are_one_json_object_each() {
        let drain = Request::Set { vip: "web".into(), backend: "198.18.0.11".into(), set: Override::Drain };
        let text = serde_json::to_string(&drain).unwrap();
        assert_eq!(text, r#"{"command":"set","vip":"web","backend":"198.18.0.11","override":"drain"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), drain);
        let weight: Request = serde_json::from_str(
            r#"{"command":"set","vip":"web","backend":"[2001:db8::11]:80","override":{"weight":5}}"#,
        )
        .unwrap();
        assert!(matches!(weight, Request::Set { set: Override::Weight(5), .. }));
        assert_eq!(serde_json::from_str::<Request>(r#"{"command":"clear"}"#).unwrap(), Request::Clear { vip: None });
        assert_eq!(serde_json::from_str::<Request>(r#"{"command":"reload"}"#).unwrap(), Request::Reload);
        assert!(serde_json::from_str::<Request>(r#"{"command":"shutdown"}"#).is_err());
        let applied = Response::Applied { generation: 2, changes: vec!["nothing changed".into()] };
        assert_eq!(
            serde_json::to_string(&applied).unwrap(),
            r#"{"result":"applied","generation":2,"changes":["nothing changed"]}"#
        );
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xdplb-runtime-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        dir
    }

    #[test]
    fn overrides_survive_in_the_state_directory() {
        let dir = scratch("overrides");
        let mut set = Overrides::new();
        assert_eq!(load_overrides(&dir, "eth0").unwrap(), set, "no file, no overrides");
        set.insert(BackendRef { vip: "web".into(), addr: "198.18.0.11".parse().unwrap(), port: 0 }, Override::Maint);
        set.insert(
            BackendRef { vip: "api".into(), addr: "2001:db8::11".parse().unwrap(), port: 8080 },
            Override::Weight(3),
        );
        check_state_dir(&dir).unwrap();
        save_overrides(&dir, "eth0", &set).unwrap();
        assert_eq!(load_overrides(&dir, "eth0").unwrap(), set);
        save_overrides(&dir, "eth0", &Overrides::new()).unwrap();
        assert!(!overrides_path(&dir, "eth0").exists(), "no overrides, no file");
        std::fs::write(overrides_path(&dir, "eth0"), "{").unwrap();
        assert!(load_overrides(&dir, "eth0").unwrap_err().to_string().ends_with("is not an overrides file"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_state_directory_others_can_write_is_refused() {
        let dir = scratch("mode");
        check_state_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o022, 0, "created for its owner only");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = check_state_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("is writable by other users (mode 1777)"), "{e}");
        assert!(e.ends_with(&format!("fix: chmod go-w {}", dir.display())), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn the_socket_is_private_answers_in_the_loop_and_goes_away() {
        let dir = scratch("socket");
        let (server, mut calls) = Server::start(&dir, "eth0").unwrap();
        let path = server.path().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A second controller for the same interface is refused at the lock,
        // and leaves the first one's socket alone.
        let e = Server::start(&dir, "eth0").err().unwrap().to_string();
        assert!(e.starts_with("another xdplb controller serves eth0"), "{e}");
        let lock = lock_path(&dir, "eth0");
        assert!(e.contains(&format!("pid {} holds the lock {}", std::process::id(), lock.display())), "{e}");
        assert!(has_socket(&dir, "eth0"), "the refused controller took the first one's socket away");
        // The "event loop": answers every request it gets.
        let looping = tokio::spawn(async move {
            while let Some((request, reply)) = calls.recv().await {
                let _ = reply.send(Response::Done { lines: vec![format!("{request:?}")] });
            }
        });
        let d = dir.clone();
        let answer =
            tokio::task::spawn_blocking(move || call(&d, "eth0", &Request::Reload, Duration::from_secs(5)).unwrap())
                .await
                .unwrap();
        assert_eq!(answer, Response::Done { lines: vec!["Reload".into()] });
        // Not JSON, and too long: errors, not a hang.
        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(b"hello\n").await.unwrap();
        let mut text = String::new();
        BufReader::new(&mut raw).read_line(&mut text).await.unwrap();
        assert!(text.starts_with(r#"{"result":"error","error":"not a request: "#), "{text}");
        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(&vec![b' '; MAX_REQUEST + 10]).await.unwrap();
        let mut text = String::new();
        BufReader::new(&mut raw).read_line(&mut text).await.unwrap();
        assert!(text.contains("at most 65536 bytes"), "{text}");
        drop(server);
        assert!(!path.exists(), "the socket goes with the server");
        looping.abort();
        // A socket left by a killed controller is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        let (again, _calls) = Server::start(&dir, "eth0").unwrap();
        assert!(has_socket(&dir, "eth0"));
        // A socket put in its place since is not ours to remove.
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(again);
        assert!(has_socket(&dir, "eth0"), "the server removed a socket it did not bind");
        drop(other);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn two_controllers_starting_at_once_leave_one_serving() {
        let dir = scratch("race");
        let d = dir.clone();
        let starts: Vec<_> = (0..2)
            .map(|_| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    let _guard = rt.enter();
                    // The runtime must outlive the server's task: kept with it.
                    Server::start(&d, "eth0").map(|(s, rx)| (s, rx, rt))
                })
            })
            .collect();
        let results: Vec<_> = starts.into_iter().map(|t| t.join().unwrap()).collect();
        let (won, lost): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
        assert_eq!((won.len(), lost.len()), (1, 1), "exactly one starts");
        let e = lost.into_iter().next().unwrap().err().unwrap().to_string();
        assert!(e.starts_with("another xdplb controller serves eth0"), "{e}");
        assert!(has_socket(&dir, "eth0"), "the winner's socket is there");
        assert!(StdUnixStream::connect(socket_path(&dir, "eth0")).is_ok(), "and it answers");
        let (server, _rx, rt) = won.into_iter().next().unwrap().unwrap();
        {
            let _guard = rt.enter();
            drop(server);
        }
        assert!(!has_socket(&dir, "eth0"));
        let _guard = rt.enter();
        Server::start(&dir, "eth0").expect("the lock goes with the server");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_symlinked_state_directory_is_refused() {
        let dir = scratch("symlink");
        let real = dir.join("real");
        check_state_dir(&real).unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = check_state_dir(&link).unwrap_err().to_string();
        assert!(e.contains("is a symlink"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn overrides_are_never_written_through_a_symlink() {
        let dir = scratch("nofollow");
        check_state_dir(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let tmp = overrides_path(&dir, "eth0").with_extension("json.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let mut set = Overrides::new();
        set.insert(BackendRef { vip: "web".into(), addr: "198.18.0.11".parse().unwrap(), port: 0 }, Override::Drain);
        save_overrides(&dir, "eth0", &set).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep", "written through the symlink");
        assert_eq!(load_overrides(&dir, "eth0").unwrap(), set);
        assert!(!std::fs::symlink_metadata(overrides_path(&dir, "eth0")).unwrap().file_type().is_symlink());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn weights_above_the_limit_are_refused() {
        let dir = scratch("weight");
        check_state_dir(&dir).unwrap();
        let path = overrides_path(&dir, "eth0");
        let file = |w: u32| format!(r#"[{{"vip":"web","address":"198.18.0.11","override":{{"weight":{w}}}}}]"#);
        std::fs::write(&path, file(65535)).unwrap();
        assert_eq!(load_overrides(&dir, "eth0").unwrap().len(), 1);
        std::fs::write(&path, file(65536)).unwrap();
        let e = load_overrides(&dir, "eth0").unwrap_err().to_string();
        assert!(e.contains("weight 65536 is out of range"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn the_socket_refuses_a_weight_above_the_limit() {
        let dir = scratch("setweight");
        let (server, mut calls) = Server::start(&dir, "eth0").unwrap();
        let looping = tokio::spawn(async move {
            while let Some((_, reply)) = calls.recv().await {
                let _ = reply.send(Response::Done { lines: vec!["done".into()] });
            }
        });
        let set = |w| Request::Set { vip: "web".into(), backend: "198.18.0.11".into(), set: Override::Weight(w) };
        let d = dir.clone();
        let answers = tokio::task::spawn_blocking(move || {
            [65535, 65536].map(|w| call(&d, "eth0", &set(w), Duration::from_secs(5)).unwrap())
        })
        .await
        .unwrap();
        assert_eq!(answers[0], Response::Done { lines: vec!["done".into()] });
        assert!(
            matches!(&answers[1], Response::Error { error } if error.contains("weight 65536 is out of range")),
            "{:?}",
            answers[1]
        );
        drop(server);
        looping.abort();
        std::fs::remove_dir_all(&dir).ok();
    }
}
