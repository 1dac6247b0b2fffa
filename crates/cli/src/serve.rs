//! `serve [-f FMT] [-r] [-U] [-x NAME] [-k SOCKET | -b ADDR -p PORT] [-e N] [-t] [--cache M]
//! [--discard M] [--detect-zeroes M] [--pid-file F] [--fork] [--vhost-user-blk SOCKET]
//! FILE`: export an image (with its backing chain) over NBD, with qemu-nbd's flags, or
//! over vhost-user-blk (`--vhost-user-blk SOCKET [--num-queues N]`). Under systemd
//! socket activation (`nbdinfo [ diskimg serve … FILE ]`) it serves NBD on the socket
//! passed as descriptor 3, as qemu-nbd does.
//!
//! The image is opened as every verb opens it (format probed or `-f`, backing chain
//! under the qemu-compatible open policy, `--image-opts`/`--object secret` for
//! encrypted images). SIGTERM and SIGINT stop the server: requests in flight finish,
//! the image is flushed and closed, and the command exits 0.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use diskimg::serve::{
    CacheMode, DetectZeroes, Discard, Export, ExportOptions, Listener, NbdConfig, NbdServer,
    Shutdown, VhostConfig, WritePolicy, serve_vhost_user_blk,
};

use crate::args::FormatArg;

/// Environment variable telling a `--fork` child to report readiness on stdout.
const READY_ENV: &str = "DISKIMG_SERVE_READY";

/// Arguments of `serve`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Let others write the image while it is served read-only (qemu-nbd's -U: the
    /// image is locked sharing writes; refused without -r, as in qemu-nbd).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Export name (default: empty).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// Export description (shown by NBD_OPT_LIST).
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// Listen on this unix socket instead of TCP.
    #[arg(short = 'k', long = "socket")]
    socket: Option<String>,
    /// TCP address to listen on [default: 0.0.0.0].
    #[arg(short = 'b', long = "bind")]
    bind: Option<String>,
    /// TCP port to listen on [default: 10809].
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// Most clients at once (0 = unlimited).
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Cache mode: writeback, writethrough, none, directsync, unsafe.
    #[arg(long = "cache", default_value = "writeback")]
    cache: String,
    /// Same as --cache=none.
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// Discard mode: ignore (off) or unmap (on).
    #[arg(long = "discard", default_value = "ignore")]
    discard: String,
    /// Zero detection for writes: off, on, unmap.
    #[arg(long = "detect-zeroes", default_value = "off")]
    detect_zeroes: String,
    /// Expose qemu:allocation-depth (always offered; accepted for qemu-nbd compatibility).
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Seconds a client has to finish the NBD handshake.
    #[arg(long = "handshake-limit", default_value_t = 10)]
    handshake_limit: u64,
    /// Write the server's process id to this file.
    #[arg(long = "pid-file")]
    pid_file: Option<String>,
    /// Run in the background once the socket listens.
    #[arg(long = "fork")]
    fork: bool,
    /// Serve vhost-user-blk on this unix socket instead of NBD.
    #[arg(long = "vhost-user-blk", value_name = "SOCKET")]
    vhost_user_blk: Option<String>,
    /// Virtqueues offered over vhost-user-blk.
    #[arg(long = "num-queues", default_value_t = 1)]
    num_queues: u16,
    /// vhost-user-blk: at queue depth 1, run a read or write of at least twice this
    /// many KiB as pieces on several threads (default 256 with the host page cache: a
    /// 1 MiB request in four pieces; 0, the default with `--cache none`/`directsync`:
    /// never).
    #[arg(long = "split-kib", value_name = "KIB")]
    split_kib: Option<usize>,
    /// vhost-user-blk: most data segments per request the guest may send (virtio's
    /// `seg_max`; 0, the default: the queue size less 2).
    #[arg(long = "seg-max", default_value_t = 0, value_name = "N")]
    seg_max: u32,
    /// vhost-user-blk: largest data segment in bytes (virtio's `size_max`; 0, the
    /// default: no limit).
    #[arg(long = "size-max", default_value_t = 0, value_name = "BYTES")]
    size_max: u32,
    /// vhost-user-blk: µs a queue's thread watches for the next request after a batch
    /// before it sleeps, as qemu's `poll-max-ns` (default 50 with the host page cache;
    /// 0, never, the default with `--cache none`/`directsync`).
    #[arg(long = "poll-us", value_name = "US")]
    poll_us: Option<u64>,
    /// vhost-user-blk: threads per queue that execute its requests besides the queue's
    /// own (default: 4 with the host page cache, 16 with `--cache none`/`directsync`,
    /// where each one keeps a request waiting at the disk).
    #[arg(long = "queue-workers", value_name = "N")]
    queue_workers: Option<usize>,
    /// How reads reach the image, as qemu-nbd's `--aio`: `threads` (the workers),
    /// `io_uring` or `native` (vhost-user-blk: each queue's thread submits plain reads
    /// to an io_uring of its own and completes them itself; `native`, Linux AIO in
    /// qemu, is served the same way). Default: `io_uring` with `--cache
    /// none`/`directsync`, else `threads`. NBD reads always go through its workers.
    #[arg(long = "aio", value_name = "MODE")]
    aio: Option<String>,
    /// The image.
    file: String,
}

fn policy(a: &Args) -> Result<WritePolicy> {
    let cache = if a.nocache { "none" } else { a.cache.as_str() };
    Ok(WritePolicy {
        cache: CacheMode::parse(cache).ok_or_else(|| anyhow!("Invalid cache mode '{cache}'"))?,
        discard: Discard::parse(&a.discard)
            .ok_or_else(|| anyhow!("Invalid discard option '{}'", a.discard))?,
        detect_zeroes: DetectZeroes::parse(&a.detect_zeroes)
            .ok_or_else(|| anyhow!("Invalid detect-zeroes option '{}'", a.detect_zeroes))?,
    })
}

pub(crate) fn run(a: Args) -> Result<i32> {
    let _ = a.allocation_depth;
    let policy = policy(&a)?;
    if a.poll_us.is_some_and(|us| us > MAX_POLL_US) {
        bail!("--poll-us must be at most {MAX_POLL_US}");
    }
    if a.queue_workers.is_some_and(|n| n > MAX_WORKERS) {
        bail!("--queue-workers must be at most {MAX_WORKERS}");
    }
    if let Some(m) = &a.aio
        && !["threads", "native", "io_uring"].contains(&m.as_str())
    {
        bail!("Invalid aio mode '{m}'");
    }
    if Listener::activation_count() > 0 {
        activation_opts(&a)?;
    }
    if a.fork && std::env::var_os(READY_ENV).is_none() {
        return fork_and_wait();
    }
    let format = a.format.of(&a.file)?;
    // Locked as qemu-nbd locks it: a writable export excludes other writers and plain
    // readers (qemu's included) for as long as it runs.
    crate::common::set_force_share(a.force_share);
    let (img, direct) = open_served(&a, format)?;
    let mut opts = ExportOptions::named(a.export_name.clone());
    opts.description = a.description.clone();
    opts.read_only = a.read_only;
    opts.policy = policy;
    let export = Arc::new(Export::new(img.device.clone(), opts));

    let shutdown = Shutdown::new();
    let signals = watch_signals(&shutdown)?;
    let served = match &a.vhost_user_blk {
        Some(path) => serve_vhost(&a, path, direct, export, &shutdown),
        None => serve_nbd(&a, export, &shutdown),
    };
    signals.close();
    let closed = img.close().context("closing the image");
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    served?;
    closed?;
    Ok(0)
}

/// Under socket activation the socket is given: refuses what would name another, with
/// qemu-nbd's messages (`socket_activation_validate_opts`), and more than one socket.
fn activation_opts(a: &Args) -> Result<()> {
    if a.socket.is_some() || a.vhost_user_blk.is_some() {
        bail!("Unix socket can't be set when using socket activation");
    }
    if a.bind.is_some() {
        bail!("The interface can't be set when using socket activation");
    }
    if a.port.is_some() {
        bail!("TCP port number can't be set when using socket activation");
    }
    // qemu-nbd forks and keeps the socket; `--fork` here starts a new process, which
    // the activation protocol (LISTEN_PID) does not name.
    if a.fork {
        bail!("--fork can't be set when using socket activation");
    }
    if Listener::activation_count() > 1 {
        bail!("diskimg does not support socket activation with LISTEN_FDS > 1");
    }
    Ok(())
}

/// Workers per vhost-user-blk queue on an `O_DIRECT` image: every request waits for the
/// disk in its own thread, so a queue depth of 16 (fio's, a guest's busy queue) needs as
/// many to keep 16 at the disk, as qemu-storage-daemon's thread pool (up to 64) and Linux
/// AIO do; with 4, 4 KiB random I/O at depth 16 was 0.57x qemu-storage-daemon's IOPS
/// (docs/benchmarks.md, "Session 10").
const DIRECT_WORKERS: usize = 16;

/// Entries of each vhost-user-blk queue's io_uring (`--aio io_uring`): more reads in
/// flight than this wait for room on the queue's thread.
const RING_DEPTH: u16 = 256;

/// Most workers per vhost-user-blk queue `--queue-workers` accepts.
const MAX_WORKERS: usize = 256;

/// Longest poll `--poll-us` accepts (1 ms: a queue's thread spins at most that long per
/// batch).
const MAX_POLL_US: u64 = 1000;

/// The host cache mode `--cache` asks for (`none`/`off` and `-n`: `O_DIRECT`;
/// `directsync`: `O_DIRECT|O_SYNC`; the others go through the page cache).
fn host_cache(a: &Args) -> diskimg::CacheMode {
    let cache = if a.nocache { "none" } else { a.cache.as_str() };
    match cache {
        "none" | "off" => diskimg::CacheMode::None,
        "directsync" => diskimg::CacheMode::DirectSync,
        _ => diskimg::CacheMode::Writeback,
    }
}

/// Opens the image as qemu-nbd does for `--cache`: `none` and `directsync` bypass the
/// host page cache (`O_DIRECT`, and `O_SYNC` for `directsync`) for every file of the
/// chain, unless a `json:`/`--image-opts` argument sets `cache.direct` itself (which
/// wins either way, as in qemu-nbd); the other modes go through it, and the export's
/// write policy ([`policy`]) adds the flushes. Returns the image and whether its files
/// bypass the page cache, which the vhost-user-blk defaults follow.
fn open_served(a: &Args, format: Option<diskimg::Format>) -> Result<(diskimg::Image, bool)> {
    let mut cache = host_cache(a);
    if crate::imgspec::is_spec_or_opts(&a.file) {
        cache = crate::imgspec::arg_cache(&a.file, cache)?;
    }
    let img = crate::opening::open_image_cached(&a.file, format, a.read_only, true, cache)?;
    Ok((img, cache.direct()))
}

fn serve_nbd(a: &Args, export: Arc<Export>, shutdown: &Shutdown) -> Result<()> {
    let listener = match &a.socket {
        _ if Listener::activation_count() > 0 => {
            Listener::activated().context("Failed to use socket activation")?
        }
        Some(path) => Listener::unix(path).with_context(|| format!("cannot listen on '{path}'"))?,
        None => {
            let bind = a.bind.as_deref().unwrap_or("0.0.0.0");
            let port = a.port.unwrap_or(10809);
            let addr = if bind.contains(':') && !bind.starts_with('[') {
                format!("[{bind}]:{port}")
            } else {
                format!("{bind}:{port}")
            };
            Listener::tcp(&addr).with_context(|| format!("cannot listen on '{addr}'"))?
        }
    };
    let mut config = NbdConfig::default();
    config.max_connections = a.shared;
    config.persistent = a.persistent;
    config.handshake_limit = Duration::from_secs(a.handshake_limit.max(1));
    ready(a)?;
    NbdServer::new(export, config)
        .serve(&listener, shutdown)
        .context("NBD server failed")
}

/// Serves vhost-user-blk; `direct`: the image's files bypass the page cache, which
/// sets the defaults of `--split-kib`, `--queue-workers` and per-request notifications.
fn serve_vhost(
    a: &Args,
    path: &str,
    direct: bool,
    export: Arc<Export>,
    shutdown: &Shutdown,
) -> Result<()> {
    let listener = Listener::unix(path).with_context(|| format!("cannot listen on '{path}'"))?;
    let mut config = VhostConfig::default();
    config.num_queues = a.num_queues;
    config.split_min = match a.split_kib {
        Some(k) => k.saturating_mul(1024),
        // One `preadv`/`pwritev` of the whole request is one request at the disk; in
        // pieces it costs twice the CPU and was slower (docs/benchmarks.md, "Session 11").
        None if direct => 0,
        None => config.split_min,
    };
    config.seg_max = a.seg_max;
    config.poll_us = match a.poll_us {
        Some(us) => us,
        // A request that waits for the disk leaves the next one tens of µs away or more: the
        // poll mostly misses and costs a core (docs/benchmarks.md, "Session 11, end").
        None if direct => 0,
        None => config.poll_us,
    };
    config.size_max = a.size_max;
    config.workers_per_queue = match a.queue_workers {
        Some(n) => n,
        None if direct => DIRECT_WORKERS,
        None => config.workers_per_queue,
    };
    // Requests that wait for the disk finish at different times: each tells the guest.
    config.notify_each = direct;
    config.ring_depth = match a.aio.as_deref() {
        Some("threads") => 0,
        Some(_) => RING_DEPTH,
        // Reads that wait for the disk cost a worker's two wake-ups each on the thread
        // path (docs/benchmarks.md, "Session 14").
        None if direct => RING_DEPTH,
        None => 0,
    };
    ready(a)?;
    serve_vhost_user_blk(export, &listener, config, shutdown)
        .context("vhost-user-blk server failed")
}

/// The socket listens: write the pid file and tell a waiting `--fork` parent.
fn ready(a: &Args) -> Result<()> {
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write pid file '{p}'"))?;
    }
    if std::env::var_os(READY_ENV).is_some() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(b"ready\n");
        let _ = out.flush();
    }
    Ok(())
}

/// Stops the server on SIGTERM, SIGINT or SIGHUP.
fn watch_signals(shutdown: &Shutdown) -> Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install signal handlers")?;
    let handle = signals.handle();
    let sd = shutdown.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                sd.trigger();
            }
        })
        .context("cannot start the signal thread")?;
    Ok(handle)
}

/// `--fork`: runs the same command again in a new process group as the server, waits
/// until it listens (it prints `ready` on the pipe), and exits 0; the server goes on.
fn fork_and_wait() -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the diskimg executable")?;
    let mut child = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(READY_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .context("cannot start the server process")?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("no pipe"))?;
    let mut line = String::new();
    let _ = std::io::BufReader::new(out).read_line(&mut line);
    if line.trim() == "ready" {
        return Ok(0);
    }
    let status = child.wait()?;
    bail!("the server exited before it was ready ({status})")
}
