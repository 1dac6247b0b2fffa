//! Opening images for qemu-io: the `open`, `close` and `reopen` commands, the global
//! `-r -s -C -t -n -U` flags, option dictionaries (`-o`, `--image-opts`, `json:{…}`),
//! and the layers `-s` (a temporary qcow2 overlay) and `-C` (copy-on-read) put over
//! the image.

use std::sync::Arc;

use diskimg::{BlockDevice, ImageOptions, OpenPolicy, OptionList};

use super::blkdebug::Blkdebug;
use super::cmd::{Cmd, bad_option, usage};
use super::filter::Filtered;
use super::getopt::{self, Event};
use super::layers::{Compress, CopyOnRead, snapshot_overlay};
use super::session::{Blk, EINVAL, OpenFlags, Session, Spec};

/// qemu's `bdrv_parse_cache_mode`; false for an unknown mode.
pub(super) fn parse_cache(mode: &str, f: &mut OpenFlags) -> bool {
    let (nocache, writethrough) = match mode {
        "off" | "none" => (true, false),
        "directsync" => (true, true),
        "writeback" | "unsafe" => (false, false),
        "writethrough" => (false, true),
        _ => return false,
    };
    f.nocache = nocache;
    f.writethrough = writethrough;
    true
}

/// qemu's `bdrv_parse_aio`.
pub(super) fn valid_aio(mode: &str) -> bool {
    matches!(mode, "threads" | "native" | "io_uring")
}

/// qemu's `bdrv_parse_discard_flags`: `Some(unmap)`.
pub(super) fn parse_discard(mode: &str) -> Option<bool> {
    match mode {
        "off" | "ignore" => Some(false),
        "on" | "unmap" => Some(true),
        _ => None,
    }
}

/// Parses an option string as qemu's `qemu_opts_parse_noisily` (with `implied_file`,
/// a first bare word is the `file` option, as `--image-opts` takes it).
pub(super) fn parse_image_opts(s: &str, implied_file: bool) -> Result<OptionList, String> {
    let mut text = s.to_string();
    if implied_file {
        let first = text.split(',').next().unwrap_or("");
        if !first.contains('=') && !first.is_empty() {
            text = format!("file={text}");
        }
    }
    OptionList::parse(&text).map_err(|e| e.to_string())
}

/// Opens `name` (or the image the options name) into the session; prints qemu-io's
/// message and returns 1 on failure.
pub(super) fn openfile(
    s: &mut Session,
    name: Option<&str>,
    flags: OpenFlags,
    dict: OptionList,
) -> i32 {
    if s.blk.is_some() {
        s.out.error("file open already, try 'help close'");
        return 1;
    }
    if flags.force_share && dict.get("force-share").is_some_and(|v| v != "on") {
        s.out.error("-U conflicts with image options");
        return 1;
    }
    let spec = Spec {
        name: name.map(str::to_string),
        dict,
        flags,
    };
    match open_spec(&spec) {
        Ok(blk) => {
            s.blk = Some(blk);
            0
        }
        Err(e) => {
            let msg = match name {
                Some(n) => format!("can't open device {n}: {e}"),
                None => format!("can't open: {e}"),
            };
            s.out.error(&msg);
            1
        }
    }
}

fn open_spec(spec: &Spec) -> Result<Blk, String> {
    let mut dict = spec.dict.clone();
    let mut name = spec.name.clone();
    if let Some(n) = name.as_deref().filter(|n| n.starts_with("json:")) {
        let json = crate::imgspec::flatten_json(n).map_err(|e| crate::message(&e))?;
        for (k, v) in json.entries() {
            if dict.get(k).is_none() {
                dict.set(k, v);
            }
        }
        name = None;
    }
    // `foo:bar` names a protocol (`Unknown protocol 'foo'`), not a file.
    if let Some(e) = name
        .as_deref()
        .and_then(|n| crate::names::protocol_error(n, false))
    {
        return Err(e.to_string());
    }
    let r = crate::imgspec::resolve(dict, name.as_deref(), None).map_err(|e| crate::message(&e))?;
    let flags = &spec.flags;
    let read_only = flags.read_only || r.read_only == Some(true);
    let cor = flags.copy_on_read || r.copy_on_read;
    if flags.copy_on_read && read_only {
        return Err("Can't use copy-on-read on read-only device".into());
    }
    if r.copy_on_read && read_only {
        // The copy-on-read filter node needs write permission on its child.
        return Err("Block node is read-only".into());
    }
    let force_share = flags.force_share || r.force_share == Some(true);
    if force_share && !read_only {
        return Err("force-share=on can only be used with read-only images".into());
    }
    let mut opts = ImageOptions::default()
        .with_policy(OpenPolicy::qemu_compatible())
        .with_secrets(crate::secrets::secrets());
    opts.node_drivers = super::blkdebug::node_drivers();
    // With -s the image itself is only read; writes go to the overlay.
    opts.read_only = read_only || flags.snapshot;
    opts.force_share = flags.force_share;
    let arg = spec.name.as_deref().unwrap_or(&r.path);
    let img = crate::imgspec::open(&r, arg, opts.clone()).map_err(|e| crate::message(&e))?;
    crate::common::report_open_repairs(&img);
    if !opts.read_only {
        crate::common::warn_probed_raw(&r.path, r.format, &img);
    }
    let mut dev: Arc<dyn BlockDevice> = img.device.clone();
    let opened = (!opts.read_only).then(super::medium::OpenedAt::now);
    if let Some(at) = opened {
        // Gone after a fatal corruption event, as qemu's node without a driver.
        dev = Arc::new(Filtered(super::medium::Medium::new(dev, at)));
    }
    if flags.snapshot {
        dev = snapshot_overlay(&img).map_err(|e| crate::message(&e))?;
    }
    let mut debug = None;
    let mut engine = r.file_debug.clone();
    if !r.blkdebug.is_empty() || !r.blkdebug_limits.is_none() {
        let b = Arc::new(Filtered(Blkdebug::new(
            dev,
            r.blkdebug.clone(),
            r.blkdebug_limits,
        )));
        engine = Some(b.engine().clone());
        dev = b.clone();
        debug = Some(b);
    }
    if cor {
        dev = Arc::new(Filtered(CopyOnRead::new(dev, debug)));
    }
    if r.compress {
        dev = Arc::new(Filtered(Compress::new(dev)));
    }
    Ok(Blk {
        img,
        dev,
        read_only,
        writethrough: flags.writethrough,
        written: std::cell::Cell::new(false),
        spec: spec.clone(),
        debug: engine,
        opened,
    })
}

/// Closes the open image (if any), reporting what closing fails with.
pub(super) fn close(s: &mut Session) {
    // Requests still suspended at a breakpoint go on (qemu would wait for them forever).
    if let Some(e) = s.blk.as_ref().and_then(|b| b.debug.as_ref()) {
        e.release_all();
    }
    s.drain();
    if let Some(b) = s.blk.take() {
        close_blk(s, &b);
    }
}

fn close_blk(s: &mut Session, b: &Blk) {
    let res = if Arc::ptr_eq(&b.dev, &b.img.device) {
        b.img.close()
    } else {
        b.dev.close().and_then(|()| b.img.close())
    };
    // qemu flushes at close only what was written since the last flush: an image that
    // was only read closes quietly (a character device cannot be flushed at all).
    let Err(e) = res else { return };
    if !b.written.get() {
        return;
    }
    // qcow2 writes its metadata back and flushes the file at close; qemu does so per
    // metadata cache and, when the file fails (a blkdebug rule, iotests 026/066), says
    // so for each of its two caches.
    // (An error that names its cache already is said as it is.)
    let named = matches!(&e, diskimg::Error::Io { context, .. } if context.starts_with("Failed to flush the "));
    if b.img.format == diskimg::Format::Qcow2 && matches!(e, diskimg::Error::Io { .. }) && !named {
        let why = crate::errmap::strerror(&e);
        s.out
            .error(&format!("Failed to flush the L2 table cache: {why}"));
        s.out
            .error(&format!("Failed to flush the refcount block cache: {why}"));
        return;
    }
    s.out.error(&crate::message(&e.into()));
}

fn close_f(s: &mut Session, _name: &str, _args: &[String]) -> i32 {
    close(s);
    0
}

fn open_f(s: &mut Session, name: &str, args: &[String]) -> i32 {
    let c = &OPEN;
    let (events, ops) = getopt::parse(name, args, "snCro:ki:t:d:U", &[]);
    let mut flags = OpenFlags::default();
    let mut dict = OptionList::new();
    for ev in events {
        let (o, a) = match ev {
            Event::Error(m) => return bad_option(s, c, &m),
            Event::Opt(o, a) => (o, a.unwrap_or_default()),
        };
        match o {
            's' => flags.snapshot = true,
            'n' => {
                flags.nocache = true;
                flags.writethrough = false;
            }
            'C' => flags.copy_on_read = true,
            'r' => flags.read_only = true,
            't' if !parse_cache(&a, &mut flags) => {
                s.out.error(&format!("Invalid cache option: {a}"));
                return -EINVAL;
            }
            'd' if parse_discard(&a).is_none() => {
                s.out.error(&format!("Invalid discard option: {a}"));
                return -EINVAL;
            }
            'i' if !valid_aio(&a) => {
                s.out.error(&format!("Invalid aio option: {a}"));
                return -EINVAL;
            }
            'o' => {
                if s.image_opts {
                    s.out
                        .print("--image-opts and 'open -o' are mutually exclusive\n");
                    return -EINVAL;
                }
                if let Err(e) = dict.extend_from(&a) {
                    s.out.error(&e.to_string());
                    return -EINVAL;
                }
            }
            'U' => flags.force_share = true,
            _ => {}
        }
    }
    let mut ops = ops;
    if let [only] = ops.as_slice()
        && s.image_opts
    {
        match parse_image_opts(only, false) {
            Ok(d) => dict = d,
            Err(e) => {
                s.out.error(&e);
                return -EINVAL;
            }
        }
        ops.clear();
    }
    let r = match ops.as_slice() {
        [name] => openfile(s, Some(name), flags, dict),
        [] => openfile(s, None, flags, dict),
        _ => {
            usage(s, c);
            return -EINVAL;
        }
    };
    if r != 0 { -EINVAL } else { 0 }
}

fn reopen_f(s: &mut Session, name: &str, args: &[String]) -> i32 {
    let c = &REOPEN;
    let Some(old) = s.blk.as_ref().map(|b| b.spec.clone()) else {
        return -EINVAL;
    };
    let (events, ops) = getopt::parse(name, args, "c:o:rw", &[]);
    let mut spec = old.clone();
    let (mut rw_given, mut cache_given) = (false, false);
    let mut extra = OptionList::new();
    for ev in events {
        let (o, a) = match ev {
            Event::Error(m) => return bad_option(s, c, &m),
            Event::Opt(o, a) => (o, a.unwrap_or_default()),
        };
        match o {
            'c' => {
                if !parse_cache(&a, &mut spec.flags) {
                    s.out.error(&format!("Invalid cache option: {a}"));
                    return -EINVAL;
                }
                cache_given = true;
            }
            'o' => {
                if let Err(e) = extra.extend_from(&a) {
                    s.out.error(&e.to_string());
                    return -EINVAL;
                }
            }
            'r' | 'w' => {
                if rw_given {
                    s.out.error("Only one -r/-w option may be given");
                    return -EINVAL;
                }
                spec.flags.read_only = o == 'r';
                rw_given = true;
            }
            _ => {}
        }
    }
    if !ops.is_empty() {
        usage(s, c);
        return -EINVAL;
    }
    if let Some(v) = extra.take("read-only") {
        if rw_given {
            s.out.error("Cannot set both -r/-w and 'read-only'");
            return -EINVAL;
        }
        match crate::imgspec::parse_bool("read-only", &v) {
            Ok(ro) => spec.flags.read_only = ro,
            Err(e) => {
                s.out.error(&e.to_string());
                return -EINVAL;
            }
        }
    }
    if (extra.get("cache.direct").is_some() || extra.get("cache.no-flush").is_some()) && cache_given
    {
        s.out.error("Cannot set both -c and the cache options");
        return -EINVAL;
    }
    // Options a reopen cannot change (qemu names the child's key); unchanged values go.
    for (key, base) in FIXED_AT_OPEN {
        if let Some(v) = extra.take(key) {
            if fixed_value(s, &old, key).as_deref() != Some(v.as_str()) {
                // Without a backing image the key is the image's own (unknown) option.
                let no_backing = s.blk.as_ref().is_some_and(|b| b.img.backing.is_none());
                let shown = if key.starts_with("backing.") && no_backing {
                    key
                } else {
                    base
                };
                s.out.error(&format!("Cannot change the option '{shown}'"));
                return -EINVAL;
            }
            spec.dict.take(key);
        }
    }
    join_options(&mut spec.dict, &extra);
    spec.dict.take("read-only");
    reopen(s, spec, old)
}

/// Merges a reopen's new options into the old ones as qemu does (`bdrv_join_options`
/// with qcow2's rules): a new overlap-check mode replaces every old overlap option, a new
/// `cache-size` the old L2 and refcount cache sizes, and an old `cache-size` goes when the
/// merge would set all three.
fn join_options(old: &mut OptionList, new: &OptionList) {
    let has = |o: &OptionList, k: &str| o.get(k).is_some();
    if has(new, "overlap-check") || has(new, "overlap-check.template") {
        let keys: Vec<String> = old
            .entries()
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| k == "overlap-check" || k.starts_with("overlap-check."))
            .collect();
        for k in keys {
            old.take(&k);
        }
    }
    if has(new, "cache-size") {
        old.take("l2-cache-size");
        old.take("refcount-cache-size");
    }
    for (k, v) in new.entries() {
        old.set(k, v);
    }
    let all = ["cache-size", "l2-cache-size", "refcount-cache-size"]
        .iter()
        .all(|k| has(old, k));
    if all && !has(new, "cache-size") {
        old.take("cache-size");
    }
}

/// The options fixed when a node is opened, on the image and its `file` and `backing`
/// children, with the name qemu reports them by.
const FIXED_AT_OPEN: [(&str, &str); 6] = [
    ("driver", "driver"),
    ("file.driver", "driver"),
    ("backing.driver", "driver"),
    ("node-name", "node-name"),
    ("file.node-name", "node-name"),
    ("backing.node-name", "node-name"),
];

/// The value of a [`FIXED_AT_OPEN`] option for the open image: as given at open, else the
/// driver in use (node names qemu generates never equal a given one).
fn fixed_value(s: &Session, old: &Spec, key: &str) -> Option<String> {
    if let Some(v) = old.dict.get(key) {
        return Some(v.to_string());
    }
    let b = s.blk.as_ref()?;
    match key {
        "driver" => Some(b.img.device.info().format.to_string()),
        "file.driver" => Some("file".to_string()),
        "backing.driver" => b.img.backing.as_ref().map(|i| i.format.name().to_string()),
        _ => None,
    }
}

/// Closes the image and opens it again as `spec`; on failure the old state returns.
fn reopen(s: &mut Session, spec: Spec, old: Spec) -> i32 {
    s.drain();
    let Some(b) = s.blk.take() else {
        return -EINVAL;
    };
    close_blk(s, &b);
    drop(b);
    match open_spec(&spec) {
        Ok(nb) => {
            s.blk = Some(nb);
            0
        }
        Err(e) => {
            s.out.error(&e);
            if let Ok(ob) = open_spec(&old) {
                s.blk = Some(ob);
            }
            -EINVAL
        }
    }
}

/// `open`, `close`, `reopen`.
pub(super) static COMMANDS: &[&Cmd] = &[&OPEN, &CLOSE, &REOPEN];

static OPEN: Cmd = Cmd {
    alt: Some("o"),
    argmin: 1,
    argmax: -1,
    nofile_ok: true,
    args: Some("[-rsCnkU] [-t cache] [-d discard] [-o options] [path]"),
    help: Some(OPEN_HELP),
    ..Cmd::new("open", open_f, "open the file specified by path")
};

static CLOSE: Cmd = Cmd {
    alt: Some("c"),
    ..Cmd::new("close", close_f, "close the current open file")
};

static REOPEN: Cmd = Cmd {
    argmax: -1,
    args: Some("[(-r|-w)] [-c cache] [-o options]"),
    help: Some(REOPEN_HELP),
    ..Cmd::new("reopen", reopen_f, "reopens an image with new options")
};

const OPEN_HELP: &str = "
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
";

const REOPEN_HELP: &str = "
 Changes the open options of an already opened image

 Example:
 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image

 -r, -- Reopen the image read-only
 -w, -- Reopen the image read-write
 -c, -- Change the cache mode to the given value
 -o, -- Changes block driver options (cf. 'open' command)

";
