//! The descriptor's content id rewritten on the first write after an open, byte for
//! byte as qemu's `vmdk_write_cid` (block/vmdk.c) rewrites it.
//!
//! qemu reads a buffer — the descriptor area of a sparse file, or a whole descriptor
//! file rounded up to 512-byte sectors (`bdrv_getlength` counts sectors, and reads past
//! the end are zeroes) — replaces what lies between `CID=` and `parentCID` with the new
//! value and a newline, and writes the whole buffer back. A descriptor file of 339 bytes
//! so becomes 512 bytes, its text followed by NULs.

use diskimg_blockio::{Error, Result, Storage};

/// Largest descriptor file qemu rewrites ("VMDK description file too big").
const MAX_FILE: u64 = 16 << 20;

/// Where the descriptor text lives.
#[derive(Debug)]
pub(crate) struct DescLocation {
    /// The file holding it.
    pub storage: std::sync::Arc<dyn Storage>,
    /// Byte offset of the text.
    pub offset: u64,
    /// Room for the text (embedded descriptors), or `None` for a separate file.
    pub room: Option<u64>,
    /// The text as read at open (up to its first NUL).
    pub text: String,
}

impl DescLocation {
    /// Writes `cid` into the descriptor as qemu does.
    pub(crate) fn write_cid(&self, cid: u32) -> Result<()> {
        let size = match self.room {
            Some(room) => room,
            None => {
                let len = self.storage.len()?;
                if len > MAX_FILE {
                    return Err(Error::invalid("VMDK description file too big"));
                }
                len.next_multiple_of(512)
            }
        };
        let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
        let have = self.storage.len()?.saturating_sub(self.offset).min(size);
        if let Some(head) = buf.get_mut(..usize::try_from(have).unwrap_or(0)) {
            self.storage.read_exact_at(head, self.offset)?;
        }
        rewrite(&mut buf, cid)?;
        self.storage.write_all_at(&buf, self.offset)
    }
}

/// `buf` with its CID replaced in place (qemu's string operations on the text up to its
/// first NUL; what follows the new terminator is left as it was).
fn rewrite(buf: &mut [u8], cid: u32) -> Result<()> {
    let Some(last) = buf.len().checked_sub(1) else {
        return Ok(());
    };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(last).min(last);
    let text = buf.get(..end).unwrap_or(&[]);
    let invalid = || Error::invalid("Invalid argument");
    let parent = find(text, b"parentCID").ok_or_else(invalid)?;
    let Some(name) = find(text, b"CID") else {
        return Ok(());
    };
    let mut new = text.get(..name + 4).unwrap_or(text).to_vec();
    new.extend_from_slice(format!("{cid:x}\n").as_bytes());
    new.extend_from_slice(text.get(parent..).unwrap_or(&[]));
    new.truncate(last);
    new.push(0);
    buf.get_mut(..new.len())
        .ok_or_else(invalid)?
        .copy_from_slice(&new);
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn as_vmdk_write_cid() {
        let text = b"# Disk DescriptorFile\nversion=1\nCID=0ced5a87\nparentCID=ffffffff\nx\n";
        let mut buf = text.to_vec();
        buf.resize(512, 0);
        rewrite(&mut buf, 0x1234).unwrap();
        let want = b"# Disk DescriptorFile\nversion=1\nCID=1234\nparentCID=ffffffff\nx\n\0";
        assert_eq!(&buf[..want.len()], want);
        // The old text's last bytes stay behind the new terminator, as in qemu.
        assert_eq!(&buf[want.len()..text.len()], b"\nx\n");
        assert!(buf[text.len()..].iter().all(|&b| b == 0));
        let mut no_parent = b"CID=1\n".to_vec();
        no_parent.resize(512, 0);
        assert!(rewrite(&mut no_parent, 1).is_err());
    }
}
