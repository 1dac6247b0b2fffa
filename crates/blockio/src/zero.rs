//! The 1 MiB zero-write loop shared by the device and storage defaults
//! ([`BlockDevice::write_zeroes`](crate::BlockDevice::write_zeroes),
//! [`write_zeroes_by_buffer`](crate::write_zeroes_by_buffer)) and by formats that can
//! only write zeroes as data.
//!
//! A leaf: it imports nothing from the crate but [`Result`], so both `device.rs` and
//! `storage/mod.rs` can use it without closing an import cycle (`device` already imports
//! `storage`; see the facade's `tests/it/import_graph.rs`).

use crate::error::Result;

/// The largest write [`zero_by_buffer`] makes, and so the size of its zero buffer.
const CHUNK: u64 = 1 << 20;

/// Writes `len` zero bytes at `offset` with `write(buf, at)` calls of at most 1 MiB from
/// one zero buffer: [`BlockDevice::write_zeroes`](crate::BlockDevice::write_zeroes)'s
/// default, [`write_zeroes_by_buffer`](crate::write_zeroes_by_buffer), and the zero path
/// of formats that can only write zeroes as data.
pub fn zero_by_buffer(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let zero = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(0)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let chunk = zero.get(..usize::try_from(n).unwrap_or(0)).unwrap_or(&[]);
        write(chunk, offset + done)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_zero_chunks_of_at_most_one_mib_in_order() {
        let mut calls = Vec::new();
        zero_by_buffer(7, CHUNK * 2 + 5, |buf, at| {
            assert!(buf.iter().all(|&b| b == 0));
            calls.push((at, buf.len()));
            Ok(())
        })
        .unwrap();
        let one = usize::try_from(CHUNK).unwrap();
        assert_eq!(calls, [(7, one), (7 + CHUNK, one), (7 + 2 * CHUNK, 5)]);
        zero_by_buffer(3, 0, |_, _| panic!("no write for an empty range")).unwrap();
    }

    #[test]
    fn stops_at_the_first_error() {
        let mut n = 0;
        let r = zero_by_buffer(0, CHUNK * 3, |_, _| {
            n += 1;
            Err(crate::Error::invalid("full"))
        });
        assert!(r.is_err());
        assert_eq!(n, 1);
    }
}
