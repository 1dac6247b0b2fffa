//! Image locking compatible with qemu's (`block/file-posix.c`).
//!
//! qemu marks what it does with an image file by shared open-file-description (OFD)
//! byte-range locks: byte `100 + i` says "I use permission *i*", byte `200 + i` says "I
//! let nobody else use permission *i*", for the permissions consistent read (0), write
//! (1), write unchanged (2) and resize (3). Before using a file it locks its own bytes
//! and then tests, for every permission it wants, that nobody holds the matching
//! "unshared" byte, and for every permission it will not share, that nobody holds the
//! matching "use" byte. diskimg takes the same bytes with the same rules, so diskimg and
//! qemu (qemu-img, qemu-io, qemu-nbd, a running VM) exclude each other as two qemu
//! processes do:
//!
//! | opened as | bytes held |
//! |---|---|
//! | format image (qcow2, vmdk, vdi, vhdx, vpc, their data files and extents), read-write | 100, 101, 103, 201, 203 |
//! | the same, read-only (backing files too) | 100, 201, 203 |
//! | raw image, read-write | 100, 101, 201 (diskimg does not share writes, as a qemu guest device with `share-rw=off`; qemu-io shares them) |
//! | raw image, read-only | 100 |
//! | any, read-only with force-share (`-U`) | 100 |
//! | a file being created | 101, 103, 203 |
//!
//! OFD locks belong to the open file description: they are released when the last
//! descriptor of it is closed (a crashed process leaves none behind) and do not depend
//! on the thread. On systems without OFD locks no locks are taken.
//!
//! `F_OFD_SETLK`/`F_OFD_GETLK` come through `nix`'s safe `fcntl` wrapper (rustix has no
//! byte-range OFD locks): no `unsafe` here.

use std::fs::File;

use crate::error::{Error, Result};

/// qemu's `BLK_PERM_CONSISTENT_READ`: reads see consistent data.
pub const PERM_CONSISTENT_READ: u8 = 0x1;
/// qemu's `BLK_PERM_WRITE`: the file is written.
pub const PERM_WRITE: u8 = 0x2;
/// qemu's `BLK_PERM_WRITE_UNCHANGED`: writes that do not change what is read.
pub const PERM_WRITE_UNCHANGED: u8 = 0x4;
/// qemu's `BLK_PERM_RESIZE`: the file's length changes.
pub const PERM_RESIZE: u8 = 0x8;
/// Every permission (`BLK_PERM_ALL`).
pub const PERM_ALL: u8 = 0xf;
/// First "uses permission" byte (`RAW_LOCK_PERM_BASE`).
pub const LOCK_PERM_BASE: i64 = 100;
/// First "does not share permission" byte (`RAW_LOCK_SHARED_BASE`).
pub const LOCK_SHARED_BASE: i64 = 200;

/// What a user of a file does with it and lets others do (qemu's `perm` and
/// `shared_perm` of the file node).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockPerms {
    /// Permissions used (`PERM_*` bits).
    pub perm: u8,
    /// Permissions others may use at the same time.
    pub shared: u8,
}

impl LockPerms {
    /// The host file of a format image (and the data files and extents it names), as
    /// qemu's format drivers request it (`bdrv_default_perms_for_storage`): metadata
    /// needs consistent reads, a writable image writes and resizes, and nobody else may
    /// write or resize under it — unless `force_share` (read-only only) shares all.
    pub fn format_file(writable: bool, force_share: bool) -> Self {
        let perm = PERM_CONSISTENT_READ
            | if writable {
                PERM_WRITE | PERM_RESIZE
            } else {
                0
            };
        Self {
            perm,
            shared: share(
                force_share && !writable,
                PERM_ALL & !(PERM_WRITE | PERM_RESIZE),
            ),
        }
    }

    /// A raw image's file: reads, and when writable writes without sharing writes (a
    /// second writer would interleave with ours).
    pub fn raw_file(writable: bool, force_share: bool) -> Self {
        if writable {
            Self {
                perm: PERM_CONSISTENT_READ | PERM_WRITE,
                shared: PERM_ALL & !PERM_WRITE,
            }
        } else {
            Self {
                perm: PERM_CONSISTENT_READ,
                shared: share(force_share, PERM_ALL),
            }
        }
    }

    /// A file being created (qemu's `raw_co_create`): written and truncated, and nobody
    /// else may resize it meanwhile.
    pub fn create() -> Self {
        Self {
            perm: PERM_WRITE | PERM_RESIZE,
            shared: PERM_ALL & !PERM_RESIZE,
        }
    }
}

fn share(all: bool, otherwise: u8) -> u8 {
    if all { PERM_ALL } else { otherwise }
}

/// qemu's `bdrv_perm_names` for one permission.
fn perm_name(bit: u8) -> &'static str {
    match bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        _ => "resize",
    }
}

/// The single-bit permissions, lowest first (qemu's `PERM_FOREACH`).
fn bits() -> impl Iterator<Item = (i64, u8)> {
    (0..4).map(|i| (i, 1u8 << i))
}

/// The lock bytes of `p` (use bytes, then unshared bytes).
fn bytes_of(p: LockPerms) -> impl Iterator<Item = i64> {
    let used = bits().filter(move |(_, b)| p.perm & b != 0);
    let unshared = bits().filter(move |(_, b)| p.shared & b == 0);
    used.map(|(i, _)| LOCK_PERM_BASE + i)
        .chain(unshared.map(|(i, _)| LOCK_SHARED_BASE + i))
}

/// Takes qemu's lock bytes for `p` on `file` and checks that no other user conflicts
/// (qemu's `raw_apply_lock_bytes` then `raw_check_lock_bytes`). On a conflict the bytes
/// taken are released again and the error is qemu's (`Failed to get "write" lock`, with
/// its `Is another process using the image [NAME]?` hint naming `name`).
pub fn acquire(file: &File, p: LockPerms, name: &str) -> Result<()> {
    if !sys::supported() {
        return Ok(());
    }
    for byte in bytes_of(p) {
        if let Err(e) = sys::set(file, byte, Kind::Shared) {
            release(file, p);
            return Err(Error::io(format!("Failed to lock byte {byte}"), e));
        }
    }
    match conflict(file, p) {
        Ok(None) => Ok(()),
        Ok(Some(what)) => {
            release(file, p);
            Err(Error::Locked {
                what: what.into(),
                path: name.to_string(),
            })
        }
        Err(e) => {
            release(file, p);
            Err(e)
        }
    }
}

/// The first conflict with another user's locks, in qemu's words and order.
fn conflict(file: &File, p: LockPerms) -> Result<Option<String>> {
    for (i, bit) in bits() {
        if p.perm & bit != 0 && sys::taken(file, LOCK_SHARED_BASE + i)? {
            return Ok(Some(format!("Failed to get \"{}\" lock", perm_name(bit))));
        }
    }
    for (i, bit) in bits() {
        if p.shared & bit == 0 && sys::taken(file, LOCK_PERM_BASE + i)? {
            return Ok(Some(format!(
                "Failed to get shared \"{}\" lock",
                perm_name(bit)
            )));
        }
    }
    Ok(None)
}

/// Releases the lock bytes of `p` on `file` (closing the last descriptor of the file
/// releases them too).
pub fn release(file: &File, p: LockPerms) {
    if !sys::supported() {
        return;
    }
    for byte in bytes_of(p) {
        // Unlocking cannot conflict; a failure leaves the byte to the final close.
        let _ = sys::set(file, byte, Kind::Unlock);
    }
}

/// What [`sys::set`] does to one byte.
#[derive(Clone, Copy)]
enum Kind {
    /// Takes a shared lock (qemu takes only shared ones).
    Shared,
    /// Releases it.
    Unlock,
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod sys {
    use std::fs::File;
    use std::io;

    use nix::fcntl::{FcntlArg, fcntl};
    use nix::libc;

    use super::Kind;

    pub(super) fn supported() -> bool {
        true
    }

    /// The `c_short` field value of a small libc constant (-1, which the kernel refuses
    /// with `EINVAL`, if one ever did not fit).
    fn short(v: libc::c_int) -> libc::c_short {
        libc::c_short::try_from(v).unwrap_or(-1)
    }

    fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
        libc::flock {
            l_type: short(kind),
            l_whence: short(libc::SEEK_SET),
            l_start: byte,
            l_len: 1,
            l_pid: 0,
        }
    }

    /// F_OFD_SETLK of one byte (shared, or unlocked).
    pub(super) fn set(file: &File, byte: i64, kind: Kind) -> io::Result<()> {
        let t = match kind {
            Kind::Shared => libc::F_RDLCK,
            Kind::Unlock => libc::F_UNLCK,
        };
        let fl = flock(t, byte);
        fcntl(file, FcntlArg::F_OFD_SETLK(&fl))
            .map(drop)
            .map_err(io::Error::from)
    }

    /// Whether another open file description holds a lock on `byte` (F_OFD_GETLK of an
    /// exclusive lock, qemu's `qemu_lock_fd_test(fd, byte, 1, true)`).
    pub(super) fn taken(file: &File, byte: i64) -> crate::Result<bool> {
        let mut fl = flock(libc::F_WRLCK, byte);
        fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))
            .map_err(|e| crate::Error::io("Failed to test lock", io::Error::from(e)))?;
        Ok(fl.l_type != short(libc::F_UNLCK))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod sys {
    use std::fs::File;
    use std::io;

    use super::Kind;

    pub(super) fn supported() -> bool {
        false
    }

    pub(super) fn set(_: &File, _: i64, _: Kind) -> io::Result<()> {
        Ok(())
    }

    pub(super) fn taken(_: &File, _: i64) -> crate::Result<bool> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_like_qemu() {
        let b = |p| bytes_of(p).collect::<Vec<_>>();
        assert_eq!(
            b(LockPerms::format_file(true, false)),
            [100, 101, 103, 201, 203]
        );
        assert_eq!(b(LockPerms::format_file(false, false)), [100, 201, 203]);
        assert_eq!(b(LockPerms::format_file(false, true)), [100]);
        // force-share never applies to a writer.
        assert_eq!(
            b(LockPerms::format_file(true, true)),
            [100, 101, 103, 201, 203]
        );
        assert_eq!(b(LockPerms::raw_file(true, false)), [100, 101, 201]);
        assert_eq!(b(LockPerms::raw_file(false, false)), [100]);
        assert_eq!(b(LockPerms::create()), [101, 103, 203]);
    }

    #[test]
    fn writers_exclude_each_other_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let open = || File::options().read(true).write(true).open(&path).unwrap();
        let (a, b) = (open(), open());
        let w = LockPerms::format_file(true, false);
        let r = LockPerms::format_file(false, false);
        acquire(&a, w, "img").unwrap();
        let e = acquire(&b, w, "img").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Failed to get \"write\" lock\nIs another process using the image [img]?"
        );
        let e = acquire(&b, r, "img").unwrap_err().to_string();
        assert!(e.starts_with("Failed to get shared \"write\" lock"), "{e}");
        acquire(&b, LockPerms::format_file(false, true), "img").unwrap();
        release(&b, LockPerms::format_file(false, true));
        // Released: the other side gets it.
        release(&a, w);
        acquire(&b, w, "img").unwrap();
        drop(b);
        // Closing the file released its locks.
        acquire(&a, r, "img").unwrap();
        acquire(&open(), r, "img").unwrap();
    }
}
