//! The inspection and housekeeping commands: `map`, `alloc`, `info`, `length`,
//! `truncate`, `sleep`, `sigraise`, `abort`, and the VM-state access of `read -b`/`write -b`.

use std::time::Duration;

use diskimg::BlockDevice;
use diskimg::blockio::Preallocation;

use super::cmd::{Cmd, bad_option, usage};
use super::getopt::{self, Event};
use super::num::cvtnum;
use super::out::cvtstr;
use super::rw::num_arg;
use super::session::{Blk, EINVAL, ENOMEDIUM, ENOTSUP, Session};
use crate::errmap::strerror;

/// Whether the top layer itself decides the content at `offset` (qemu's
/// `bdrv_is_allocated`), and for how many bytes (0 at or past the end).
fn is_allocated(dev: &dyn BlockDevice, offset: u64, bytes: u64) -> diskimg::Result<(bool, u64)> {
    let size = dev.virtual_size();
    if offset >= size || bytes == 0 {
        return Ok((false, 0));
    }
    let e = dev.map(offset, bytes.min(size - offset))?;
    // Formats qemu cannot layer (vpc, vdi, vhdx, raw) report unallocated ranges as zero,
    // which counts as allocated; qcow2 and vmdk leave them to the (absent) backing file.
    let layered = matches!(dev.info().format, "qcow2" | "vmdk") || dev.backing_device().is_some();
    let alloc = e.kind.is_present() || !layered;
    Ok((alloc, e.len))
}

fn alloc_f(s: &mut Session, _name: &str, args: &[String]) -> i32 {
    let [first, rest @ ..] = args else {
        return -EINVAL;
    };
    let start = match num_arg(s, first) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut count = match rest.first() {
        Some(a) => match num_arg(s, a) {
            Ok(v) => v,
            Err(e) => return e,
        },
        None => 512,
    };
    let Some(b) = s.blk.as_ref() else {
        return -EINVAL;
    };
    let (mut offset, mut remaining, mut sum) = (start, count, 0u64);
    while remaining > 0 {
        let (alloc, num) = match is_allocated(b.dev.as_ref(), offset, remaining) {
            Ok(x) => x,
            Err(e) => {
                s.out
                    .print(&format!("is_allocated failed: {}\n", strerror(&e)));
                return -5;
            }
        };
        offset += num;
        remaining -= num;
        if alloc {
            sum += num;
        }
        if num == 0 {
            count -= remaining;
            remaining = 0;
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let at = cvtstr(start as f64);
    s.out
        .print(&format!("{sum}/{count} bytes allocated at offset {at}\n"));
    0
}

fn map_f(s: &mut Session, _name: &str, _args: &[String]) -> i32 {
    let Some(b) = s.blk.as_ref() else {
        return -EINVAL;
    };
    if b.gone() {
        s.out.error("Failed to query image length: No medium found");
        return -ENOMEDIUM;
    }
    let dev = b.dev.clone();
    let size = dev.virtual_size();
    let mut offset = 0u64;
    let mut text = String::new();
    let mut err = None;
    while offset < size {
        // Runs of one allocation state, merged (qemu-io's map_is_allocated).
        let (first, mut num) = match is_allocated(dev.as_ref(), offset, size - offset) {
            Ok(x) => x,
            Err(e) => {
                err = Some(e);
                break;
            }
        };
        while offset + num < size {
            match is_allocated(dev.as_ref(), offset + num, size - offset - num) {
                Ok((a, n)) if a == first && n > 0 => num += n,
                _ => break,
            }
        }
        let state = if first {
            "    allocated"
        } else {
            "not allocated"
        };
        #[allow(clippy::cast_precision_loss)]
        text.push_str(&format!(
            "{} (0x{num:x}) bytes {state} at offset {} (0x{offset:x})\n",
            cvtstr(num as f64),
            cvtstr(offset as f64)
        ));
        offset += num;
    }
    s.out.print(&text);
    if let Some(e) = err {
        s.out.error(&format!(
            "Failed to get allocation status: {}",
            strerror(&e)
        ));
        return -5;
    }
    0
}

fn length_f(s: &mut Session, _name: &str, _args: &[String]) -> i32 {
    let Some(b) = s.blk.as_ref() else {
        return -EINVAL;
    };
    if b.gone() {
        s.out.print("getlength: No medium found\n");
        return -ENOMEDIUM;
    }
    #[allow(clippy::cast_precision_loss)]
    let t = cvtstr(b.dev.virtual_size() as f64);
    s.out.print(&format!("{t}\n"));
    0
}

/// qemu's `vm_state_offset` of a qcow2 image: the guest offset covered by the whole
/// L1 entries of the disk.
fn vm_state_offset(dev: &dyn BlockDevice, cluster: u64) -> u64 {
    let extended = dev.info().format_specific.as_ref().is_some_and(|(_, d)| {
        d.iter()
            .any(|(k, v)| k == "extended-l2" && *v == diskimg::blockio::InfoValue::Bool(true))
    });
    let entry = if extended { 16 } else { 8 };
    let per_l1 = cluster.saturating_mul(cluster / entry).max(1);
    dev.virtual_size().div_ceil(per_l1).saturating_mul(per_l1)
}

fn info_f(s: &mut Session, _name: &str, _args: &[String]) -> i32 {
    let Some(b) = s.blk.as_ref() else {
        return -EINVAL;
    };
    let info = b.img.device.info();
    let mut t = format!("format name: {}\n", info.format);
    // null-co has no `bdrv_get_info`: qemu-io 10 prints the name twice and fails the
    // command (without a message).
    if info.format == "null-co" {
        s.out.print(&t);
        s.out.print(&t);
        return -ENOTSUP;
    }
    let cluster = match info.format {
        "raw" => 0,
        "vmdk" if info.cluster_size.is_none() => 0,
        _ => info.cluster_size.unwrap_or(0),
    };
    let vm = if info.format == "qcow2" {
        vm_state_offset(b.img.device.as_ref(), cluster)
    } else {
        0
    };
    #[allow(clippy::cast_precision_loss)]
    t.push_str(&format!(
        "cluster size: {}\nvm state offset: {}\n",
        cvtstr(cluster as f64),
        cvtstr(vm as f64)
    ));
    if let Some((_, data)) = info.format_specific.as_ref().filter(|(_, d)| !d.is_empty()) {
        t.push_str("Format specific information:\n");
        crate::info::dump_map(data, 1, &mut t);
    }
    s.out.print(&t);
    0
}

fn truncate_f(s: &mut Session, name: &str, args: &[String]) -> i32 {
    let c = &TRUNCATE;
    let (events, ops) = getopt::parse(name, args, "m:", &[]);
    let mut prealloc = Preallocation::Off;
    for ev in events {
        match ev {
            Event::Error(m) => return bad_option(s, c, &m),
            Event::Opt(_, a) => {
                let a = a.unwrap_or_default();
                match Preallocation::parse(&a) {
                    Ok(p) => prealloc = p,
                    Err(_) => {
                        s.out.error(&format!("Invalid preallocation mode '{a}'"));
                        return -EINVAL;
                    }
                }
            }
        }
    }
    let Some(arg) = ops.first() else {
        usage(s, c);
        return -EINVAL;
    };
    let offset = match cvtnum(arg) {
        Ok(v) => v,
        Err(e) => {
            s.out
                .print(&e.message(args.first().map_or("", String::as_str)));
            return -EINVAL;
        }
    };
    let Some(b) = s.blk.as_ref() else {
        return -EINVAL;
    };
    if let Err(e) = b.dev.resize(offset, prealloc, true) {
        s.out.error(&crate::message(&e.into()));
        return -5;
    }
    0
}

fn sleep_f(s: &mut Session, _name: &str, args: &[String]) -> i32 {
    let arg = args.first().map_or("", String::as_str);
    match arg.parse::<u64>() {
        Ok(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
            0
        }
        Err(_) => {
            s.out.print(&format!("{arg} is not a valid number\n"));
            -EINVAL
        }
    }
}

fn sigraise_f(s: &mut Session, _name: &str, args: &[String]) -> i32 {
    let arg = args.first().map_or("", String::as_str);
    let sig = match num_arg(s, arg) {
        Ok(v) => v,
        Err(e) => return e,
    };
    if sig > 64 {
        s.out.print(&format!(
            "signal argument '{arg}' is too large to be a valid signal\n"
        ));
        return -EINVAL;
    }
    s.out.flush();
    let sig = i32::try_from(sig).unwrap_or(0);
    match rustix::process::Signal::from_named_raw(sig) {
        Some(signal) => {
            let _ = rustix::process::kill_process(rustix::process::getpid(), signal);
            0
        }
        None => -EINVAL,
    }
}

fn abort_f(s: &mut Session, _name: &str, _args: &[String]) -> i32 {
    s.out.flush();
    std::process::abort()
}

/// `read -b`: the VM state area of formats with internal snapshots (qcow2), read from
/// the opened image itself (not a snapshot or copy-on-read layer over it, as qemu's
/// `bdrv_load_vmstate` goes to the format node).
pub(super) fn load_vmstate(b: &Blk, buf: &mut [u8], offset: u64) -> diskimg::Result<()> {
    match b.dev.as_snapshots() {
        Some(s) => s.load_vmstate(buf, offset),
        None => Err(diskimg::Error::unsupported(b.dev.info().format, "VM state")),
    }
}

/// `write -b` (see [`load_vmstate`]).
pub(super) fn save_vmstate(b: &Blk, buf: &[u8], offset: u64) -> diskimg::Result<()> {
    if b.read_only {
        return Err(diskimg::Error::ReadOnly);
    }
    match b.dev.as_snapshots() {
        Some(s) => s.save_vmstate(buf, offset),
        None => Err(diskimg::Error::unsupported(b.dev.info().format, "VM state")),
    }
}

/// `map`, `alloc`, `info`, `length`, `truncate`, `sleep`, `sigraise`, `abort`.
pub(super) static COMMANDS: &[&Cmd] = &[
    &MAP, &ALLOC, &INFO, &LENGTH, &TRUNCATE, &SLEEP, &SIGRAISE, &ABORT,
];

static MAP: Cmd = Cmd {
    args: Some(""),
    ..Cmd::new("map", map_f, "prints the allocated areas of a file")
};

static ALLOC: Cmd = Cmd {
    alt: Some("a"),
    argmin: 1,
    argmax: 2,
    args: Some("offset [count]"),
    ..Cmd::new(
        "alloc",
        alloc_f,
        "checks if offset is allocated in the file",
    )
};

static INFO: Cmd = Cmd {
    alt: Some("i"),
    ..Cmd::new("info", info_f, "prints information about the current file")
};

static LENGTH: Cmd = Cmd {
    alt: Some("l"),
    ..Cmd::new("length", length_f, "gets the length of the current file")
};

static TRUNCATE: Cmd = Cmd {
    alt: Some("t"),
    argmin: 1,
    argmax: 3,
    write: true,
    args: Some("[-m prealloc_mode] off"),
    ..Cmd::new(
        "truncate",
        truncate_f,
        "truncates the current file at the given offset",
    )
};

static SLEEP: Cmd = Cmd {
    argmin: 1,
    argmax: 1,
    nofile_ok: true,
    ..Cmd::new(
        "sleep",
        sleep_f,
        "waits for the given value in milliseconds",
    )
};

static SIGRAISE: Cmd = Cmd {
    argmin: 1,
    argmax: 1,
    nofile_ok: true,
    args: Some("signal"),
    help: Some(SIGRAISE_HELP),
    ..Cmd::new("sigraise", sigraise_f, "raises a signal")
};

static ABORT: Cmd = Cmd {
    nofile_ok: true,
    ..Cmd::new("abort", abort_f, "simulate a program crash using abort(3)")
};

const SIGRAISE_HELP: &str = "
 raises the given signal

 Example:
 'sigraise 15' - raises SIGTERM

 Invokes raise(signal), where \"signal\" is the mandatory integer argument
 given to sigraise.

";
