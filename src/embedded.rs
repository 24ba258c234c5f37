//! A private PostgreSQL cluster, so a user without a database can run acraflow (`POSTGRES_DSN` unset).
//!
//! - `initdb` once into `<home>/pgdata` (kept between runs), with a generated password in `<home>/password`
//!   (mode 0600) and `scram-sha-256` authentication; the server listens on 127.0.0.1 only, on a free port,
//!   with its socket directory at `<home>/sock`, and `wal_level=logical`.
//! - PostgreSQL refuses to run as root, so as root the server runs as the `postgres` OS user.
//! - The server's output goes to `<home>/postgres.log`, never to a pipe (a full pipe nobody reads stalls the
//!   server after ~64 KB of log).
//! - Readiness is read from `postmaster.pid` (status line `ready`), not guessed with a sleep.
//! - The server never outlives us: it is stopped (fast shutdown) when the [`Cluster`] is dropped, and the
//!   kernel signals it if this process dies first (`PR_SET_PDEATHSIG`, set on a thread that lives as long
//!   as the cluster, after the uid change, which would otherwise clear it). It runs in its own process group
//!   so a terminal's Ctrl-C reaches acraflow, which drains, rather than the server.
//! - When another acraflow process already runs a server on the same data directory, we attach to it.
//! - `synchronous_commit` stays on: turning it off delays what logical replication sees by ~200 ms.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};
use rand::distributions::{Alphanumeric, DistString};

use crate::error::{Error, ErrorKind, Result};

/// The role and database acraflow creates in its private cluster.
pub const ROLE: &str = "acraflow";
pub const DATABASE: &str = "acraflow";

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Holds `pgdata/`, `sock/`, `password` and `postgres.log`.
    pub home: PathBuf,
    /// `fsync` and `full_page_writes` on. Tests turn it off: their clusters are disposable.
    pub durable: bool,
    /// Listen on this port instead of a free one (to restart a server at the same address).
    pub port: Option<u16>,
}

impl ClusterOptions {
    /// `ACRAFLOW_HOME`, else `/var/lib/acraflow` for root (a path the `postgres` user can reach),
    /// else `$XDG_DATA_HOME/acraflow` or `~/.local/share/acraflow`.
    pub fn default_home() -> PathBuf {
        if let Some(h) = std::env::var_os("ACRAFLOW_HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(h);
        }
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from("/var/lib/acraflow");
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(x).join("acraflow");
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        home.join(".local/share/acraflow")
    }
}

/// A running private cluster (ours, or one we attached to).
pub struct Cluster {
    port: u16,
    password: String,
    home: PathBuf,
    keeper: Option<Keeper>,
}

struct Keeper {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Cluster {
    pub fn start(opts: &ClusterOptions) -> Result<Cluster> {
        let bin = find_bin_dir()?;
        let user = server_user()?;
        let home = opts.home.clone();
        let pgdata = home.join("pgdata");
        let sock = home.join("sock");
        // The home is the user's when it exists: its mode is theirs to choose. Made here, it is traversable
        // (the server may run as the postgres OS user), its contents private.
        if !home.exists() {
            make_dir(&home, 0o755, None)?;
        }
        make_dir(&sock, 0o755, user.as_ref())?;
        let password = load_or_create_password(&home)?;
        if !pgdata.join("PG_VERSION").exists() {
            initdb(&bin, &home, &pgdata, &password, user.as_ref(), opts.durable)?;
        }
        wait_for_stopping_server(&pgdata);
        if let Some(port) = running_server_port(&pgdata) {
            tracing::info!(port, data_dir = %pgdata.display(), "attached to the private PostgreSQL already running");
            return Ok(Cluster { port, password, home, keeper: None });
        }

        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let log_path = home.join("postgres.log");
        // The server's log can hold statements and their values: readable by its owner only.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))?;
        fs::set_permissions(&log_path, fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("setting permissions on {}", log_path.display()), e))?;
        let settings = server_settings(&sock, opts.durable);
        write_config(&pgdata, &settings, user.as_ref())?;
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D").arg(&pgdata).arg("-p").arg(port.to_string());
        for (k, v) in &settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let log_err = log.try_clone().map_err(|e| Error::io("duplicating the log file handle", e))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err).process_group(0);
        if let Some(u) = &user {
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        // The death signal is armed in the child, after fork: if acraflow died before it was armed (a SIGKILL
        // during start-up), the child has already been re-parented and must not start an orphan server.
        let parent = nix::unistd::getpid();
        // SAFETY: prctl and getppid are async-signal-safe; nothing here allocates or locks.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGINT).map_err(std::io::Error::from)?;
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
                }
                Ok(())
            });
        }

        let exited: Arc<Mutex<Option<ExitStatus>>> = Arc::default();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (pid_tx, pid_rx) = mpsc::channel::<std::io::Result<u32>>();
        let exited_in_keeper = Arc::clone(&exited);
        // The keeper thread spawns the server and lives exactly as long as it should: the death signal
        // follows the thread that forked, not the process.
        let thread = std::thread::Builder::new()
            .name("acraflow-postgres".into())
            .spawn(move || keep(cmd, pid_tx, stop_rx, exited_in_keeper))
            .map_err(|e| Error::io("starting the postgres keeper thread", e))?;
        let pid = pid_rx
            .recv()
            .map_err(|_| Error::new(ErrorKind::Embedded, "the postgres keeper thread exited before starting it"))?
            .map_err(|e| Error::io(format!("starting {}", bin.join("postgres").display()), e))?;
        let cluster = Cluster { port, password, home, keeper: Some(Keeper { stop: stop_tx, thread }) };
        wait_ready(&pgdata, pid, &exited, &log_path)?;
        tracing::info!(port, pid, data_dir = %pgdata.display(), "started private PostgreSQL");
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// A libpq-style connection string for `dbname` in this cluster.
    pub fn dsn(&self, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user={ROLE} password={} dbname={dbname}", self.port, self.password)
    }

    /// Creates the `acraflow` database when missing and returns its DSN.
    pub async fn ensure_database(&self) -> Result<String> {
        let (client, conn) = tokio_postgres::connect(&self.dsn("postgres"), tokio_postgres::NoTls)
            .await
            .map_err(|e| Error::db("connecting to the private PostgreSQL", e))?;
        let conn = tokio::spawn(conn);
        let exists = client
            .query_opt("select 1 from pg_database where datname = $1", &[&DATABASE])
            .await
            .map_err(|e| Error::db("looking up the acraflow database", e))?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("create database {DATABASE}"))
                .await
                .map_err(|e| Error::db("creating the acraflow database", e))?;
        }
        drop(client);
        let _ = conn.await;
        Ok(self.dsn(DATABASE))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(k) = self.keeper.take() {
            drop(k.stop);
            let _ = k.thread.join();
        }
    }
}

fn keep(
    mut cmd: Command,
    pid_tx: mpsc::Sender<std::io::Result<u32>>,
    stop_rx: mpsc::Receiver<()>,
    exited: Arc<Mutex<Option<ExitStatus>>>,
) {
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = pid_tx.send(Err(e));
            return;
        }
    };
    let _ = pid_tx.send(Ok(child.id()));
    // Until the cluster is dropped (the sender goes away), watch for the server exiting on its own.
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(Duration::from_millis(200)) {
        if let Ok(Some(status)) = child.try_wait() {
            *exited.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
            return;
        }
    }
    // Fast shutdown (SIGINT), then SIGKILL if it does not finish in time.
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGINT);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_ready(pgdata: &Path, pid: u32, exited: &Mutex<Option<ExitStatus>>, log: &Path) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = *exited.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(Error::new(
                ErrorKind::Embedded,
                format!("PostgreSQL exited during start-up ({status}); its log ends with:\n{}", log_tail(log)),
            ));
        }
        if let Ok(text) = fs::read_to_string(pgdata.join("postmaster.pid")) {
            let lines: Vec<&str> = text.lines().collect();
            if lines.first().map(|l| l.trim()) == Some(&*pid.to_string())
                && lines.get(7).map(|l| l.trim()) == Some("ready")
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Embedded,
                format!(
                    "PostgreSQL did not become ready within {}s; its log ends with:\n{}",
                    READY_TIMEOUT.as_secs(),
                    log_tail(log)
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A server from an earlier run may still be shutting down (its pid file says `stopping`); starting a new
/// one before it is gone would fail on the lock file.
fn wait_for_stopping_server(pgdata: &Path) {
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        let Ok(text) = fs::read_to_string(pgdata.join("postmaster.pid")) else {
            return;
        };
        let lines: Vec<&str> = text.lines().collect();
        let alive = lines
            .first()
            .and_then(|l| l.trim().parse::<i32>().ok())
            .is_some_and(|pid| kill(Pid::from_raw(pid), None).is_ok());
        let ready = lines.get(7).map(|l| l.trim()) == Some("ready");
        if !alive || ready {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The port of a live server already running on `pgdata`, per its `postmaster.pid`.
fn running_server_port(pgdata: &Path) -> Option<u16> {
    let text = fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let pid: i32 = lines.first()?.trim().parse().ok()?;
    let port: u16 = lines.get(3)?.trim().parse().ok()?;
    let ready = lines.get(7).map(|l| l.trim()) == Some("ready");
    (ready && kill(Pid::from_raw(pid), None).is_ok()).then_some(port)
}

/// `durable`: initdb syncs what it wrote (`-N`, no sync, is for throwaway test clusters only).
fn initdb(bin: &Path, home: &Path, pgdata: &Path, password: &str, user: Option<&User>, durable: bool) -> Result<()> {
    // No PG_VERSION means an earlier initdb did not finish: what it left is ours and incomplete.
    if pgdata.exists() {
        fs::remove_dir_all(pgdata).map_err(|e| Error::io(format!("removing incomplete {}", pgdata.display()), e))?;
    }
    make_dir(pgdata, 0o700, user)?;
    let pwfile = home.join(".initdb-password");
    write_private(&pwfile, password, user)?;
    let mut cmd = Command::new(bin.join("initdb"));
    // Collation C sorts UTF-8 text exactly as C.UTF-8 does (by code point) but compares with memcmp instead
    // of strcoll: every uen probe and index insert is cheaper. Character classes stay C.UTF-8's, so
    // upper() and lower() still know non-ASCII letters.
    cmd.arg("-D").arg(pgdata).args(["-U", ROLE, "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"]);
    cmd.arg("--lc-collate=C");
    if !durable {
        cmd.arg("-N");
    }
    cmd.arg(format!("--pwfile={}", pwfile.display()));
    if let Some(u) = user {
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let out = cmd.stdin(Stdio::null()).output();
    let _ = fs::remove_file(&pwfile);
    let out = out.map_err(|e| Error::io(format!("running {}", bin.join("initdb").display()), e))?;
    if !out.status.success() {
        let hint = if user.is_some() {
            format!(
                "\nhint: the `postgres` OS user must be able to reach {}; set ACRAFLOW_HOME to a directory it can \
                 traverse (for example /var/lib/acraflow)",
                home.display()
            )
        } else {
            String::new()
        };
        return Err(Error::new(
            ErrorKind::Embedded,
            format!(
                "initdb failed ({}):\n{}{}{hint}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    Ok(())
}

/// Where the server binaries are: `ACRAFLOW_PG_BIN`, Debian's `/usr/lib/postgresql/<newest>/bin`, or PATH.
pub fn find_bin_dir() -> Result<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("ACRAFLOW_PG_BIN").map(PathBuf::from) {
        if has_server(&dir) {
            return Ok(dir);
        }
        return Err(Error::config(format!("ACRAFLOW_PG_BIN={} does not contain initdb and postgres", dir.display())));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has_server(d))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    Err(Error::new(
        ErrorKind::Embedded,
        "PostgreSQL server binaries (initdb, postgres) were not found in /usr/lib/postgresql/*/bin or on PATH. \
         Install them with `sudo apt-get install -y postgresql`, set ACRAFLOW_PG_BIN to the directory that \
         holds them, or set POSTGRES_DSN to use an existing server",
    ))
}

fn server_user() -> Result<Option<User>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(u)) => Ok(Some(u)),
        _ => Err(Error::new(
            ErrorKind::Embedded,
            "running as root, but there is no `postgres` OS user to run the server as (PostgreSQL refuses root); \
             install the postgresql package, which creates it, or run acraflow as a normal user",
        )),
    }
}

/// The settings the private server runs with.
fn server_settings(sock: &Path, durable: bool) -> Vec<(&'static str, String)> {
    let on_off = |b: bool| if b { "on" } else { "off" }.to_owned();
    vec![
        ("listen_addresses", "127.0.0.1".into()),
        ("unix_socket_directories", sock.to_string_lossy().into_owned()),
        ("wal_level", "logical".into()),
        ("max_wal_senders", "20".into()),
        ("max_replication_slots", "20".into()),
        ("max_connections", "200".into()),
        ("fsync", on_off(durable)),
        ("full_page_writes", on_off(durable)),
        ("synchronous_commit", "on".into()),
        ("log_min_messages", "warning".into()),
        ("logging_collector", "off".into()),
    ]
}

/// The settings also go into the cluster's own configuration (`acraflow.conf`, included from
/// `postgresql.conf`), so standard tools (`pg_ctl -D <home>/pgdata start`) start it as acraflow does.
fn write_config(pgdata: &Path, settings: &[(&'static str, String)], owner: Option<&User>) -> Result<()> {
    let mut text = String::from("# Written by acraflow at every start: the settings its private server needs.\n");
    for (k, v) in settings {
        text.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
    }
    write_private(&pgdata.join("acraflow.conf"), &text, owner)?;
    let conf = pgdata.join("postgresql.conf");
    let current = fs::read_to_string(&conf).map_err(|e| Error::io(format!("reading {}", conf.display()), e))?;
    if !current.lines().any(|l| l.trim() == "include_if_exists = 'acraflow.conf'") {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(|e| Error::io(format!("writing {}", conf.display()), e))?;
        f.write_all(b"\ninclude_if_exists = 'acraflow.conf'\n")
            .map_err(|e| Error::io(format!("writing {}", conf.display()), e))?;
    }
    Ok(())
}

fn make_dir(dir: &Path, mode: u32, owner: Option<&User>) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("setting permissions on {}", dir.display()), e))?;
    if let Some(u) = owner {
        std::os::unix::fs::chown(dir, Some(u.uid.as_raw()), Some(u.gid.as_raw()))
            .map_err(|e| Error::io(format!("giving {} to the postgres user", dir.display()), e))?;
    }
    Ok(())
}

fn write_private(path: &Path, content: &str, owner: Option<&User>) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    f.write_all(content.as_bytes()).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    if let Some(u) = owner {
        std::os::unix::fs::chown(path, Some(u.uid.as_raw()), Some(u.gid.as_raw()))
            .map_err(|e| Error::io(format!("giving {} to the postgres user", path.display()), e))?;
    }
    Ok(())
}

fn load_or_create_password(home: &Path) -> Result<String> {
    let path = home.join("password");
    if let Ok(p) = fs::read_to_string(&path) {
        if !p.trim().is_empty() {
            return Ok(p.trim().to_owned());
        }
    }
    let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 32);
    write_private(&path, &password, None)?;
    Ok(password)
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("finding a free port", e))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| Error::io("finding a free port", e))
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
