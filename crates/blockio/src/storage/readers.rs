//! [`Readers`]: open file descriptions of their own for the threads reading one
//! [`FileStorage`](super::FileStorage), so that threads reading one image at once do not
//! share kernel state per read.
//!
//! A `pread` on a descriptor shared by the threads of a process takes and drops a
//! reference on the open file description (`fdget`/`fput`: two atomic operations on one
//! cache line) and records the read position in its readahead state: two threads reading
//! one file bounce those cache lines between their cores on every read. A second
//! description of the same file (opened through `/proc/self/fd`) shares the page cache
//! and the inode, so reads through it see every write made through the first, but none
//! of that per-read state.
//!
//! The first thread that reads uses the storage's own descriptor; each other thread (up
//! to [`SHARDS`] of them, by a per-thread index; more share) gets a read-only description
//! on its first read, with the same `O_DIRECT` flag. Where none can be opened (no
//! `/proc`, not a regular file, another inode behind the path) the thread reads through
//! the storage's own descriptor, as before. Writes, locks and everything else always use
//! the storage's own descriptor; the extra ones hold no locks.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Descriptions per storage: threads whose indexes are equal modulo this share one.
pub(crate) const SHARDS: usize = 4;

/// No thread has read yet.
const NONE: usize = usize::MAX;

/// A per-thread index (0, 1, 2, … in the order threads first read a file storage).
fn thread_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// The reading threads' descriptions of one file (see the module docs).
#[derive(Debug)]
pub(crate) struct Readers {
    /// The shard that reads through the storage's own descriptor.
    primary: AtomicUsize,
    /// A description per other shard, opened on its first read (`None`: could not be).
    slots: [OnceLock<Option<File>>; SHARDS],
}

impl Default for Readers {
    fn default() -> Self {
        Self {
            primary: AtomicUsize::new(NONE),
            slots: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl Readers {
    /// The file the calling thread reads `main`'s bytes through.
    pub(crate) fn pick<'a>(&'a self, main: &'a File) -> &'a File {
        let shard = thread_shard();
        let primary = self.primary.load(Ordering::Relaxed);
        if primary == shard {
            return main;
        }
        if primary == NONE {
            match self
                .primary
                .compare_exchange(NONE, shard, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return main,
                Err(p) if p == shard => return main,
                Err(_) => {}
            }
        }
        self.slots
            .get(shard)
            .and_then(|s| s.get_or_init(|| reopen(main)).as_ref())
            .unwrap_or(main)
    }
}

/// A new read-only description of `main`'s file (with its `O_DIRECT` flag), or `None`.
fn reopen(main: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let md = main.metadata().ok()?;
    if !md.is_file() {
        return None;
    }
    let direct = rustix::fs::fcntl_getfl(main)
        .ok()?
        .intersection(rustix::fs::OFlags::DIRECT);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(i32::try_from(direct.bits()).ok()?)
        .open(format!("/proc/self/fd/{}", main.as_raw_fd()))
        .ok()?;
    let again = f.metadata().ok()?;
    (again.dev() == md.dev() && again.ino() == md.ino()).then_some(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn threads_read_through_their_own_descriptions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let main = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let r = Readers::default();
        // The first reader uses the storage's own descriptor.
        assert!(std::ptr::eq(r.pick(&main), &main));
        let first = thread_shard();
        let seen: Vec<(usize, bool, u8)> = std::thread::scope(|s| {
            let h: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        let f = r.pick(&main);
                        // A write through the main descriptor is seen through any.
                        main.write_all_at(&[9], 4096).unwrap();
                        let mut b = [0u8; 1];
                        f.read_exact_at(&mut b, 4096).unwrap();
                        (thread_shard(), std::ptr::eq(f, &main), b[0])
                    })
                })
                .collect();
            h.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (shard, main_fd, byte) in seen {
            assert_eq!(byte, 9);
            // A thread of another shard than the first reader's has its own description.
            assert_eq!(main_fd, shard == first);
        }
    }
}
