//! `NBD_CMD_BLOCK_STATUS` replies for the two metadata contexts served:
//! `base:allocation` (the NBD spec's "Metadata querying") and `qemu:allocation-depth`
//! (qemu's `docs/interop/nbd.rst`: 0 unallocated, 1 the top image, 2 its backing, …).

use diskimg_blockio::MapEntry;

use super::proto::*;
use crate::export::{Export, Fault};

/// At most this many extents are looked up for one request (the client asks again
/// from where the reply ended; the spec allows a short reply).
const MAX_EXTENTS: usize = 1 << 16;

/// A metadata context a client can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:allocation-depth`.
    Depth,
}

impl Context {
    /// Every context the server offers, in id order.
    pub(crate) const ALL: [Context; 2] = [Context::Allocation, Context::Depth];

    /// The context's name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Context::Allocation => "base:allocation",
            Context::Depth => "qemu:allocation-depth",
        }
    }

    /// The id used in replies (fixed per context).
    pub(crate) fn id(self) -> u32 {
        match self {
            Context::Allocation => 0,
            Context::Depth => 1,
        }
    }

    /// Whether `NBD_OPT_LIST_META_CONTEXT` query `q` lists this context: its full
    /// name, or its namespace with an empty leaf (`base:`, `qemu:`).
    pub(crate) fn listed_by(self, q: &[u8]) -> bool {
        let name = self.name();
        let ns_len = name.find(':').map_or(0, |i| i + 1);
        q == name.as_bytes() || q == name.as_bytes().get(..ns_len).unwrap_or(&[])
    }

    /// The status value of an extent in this context.
    fn value(self, e: &MapEntry) -> u32 {
        match self {
            Context::Allocation => {
                (if e.data { 0 } else { STATE_HOLE }) | (if e.zero { STATE_ZERO } else { 0 })
            }
            Context::Depth if e.present => e.depth.saturating_add(1),
            Context::Depth => 0,
        }
    }
}

/// Builds the reply to a block-status request: one chunk per selected context, the
/// last one flagged done. With `one` (`REQ_ONE`) each chunk has a single extent.
pub(crate) fn block_status_reply(
    export: &Export,
    contexts: &[Context],
    (framing, cookie): (Framing, u64),
    offset: u64,
    len: u64,
    one: bool,
    out: &mut Vec<u8>,
) -> Result<(), Fault> {
    export.check(offset, len)?;
    if len == 0 {
        return Err(Fault::Inval);
    }
    let end = offset + len;
    let mut entries = Vec::new();
    let mut pos = offset;
    while pos < end && entries.len() < MAX_EXTENTS {
        let e = export.status(pos, end - pos)?;
        if e.length == 0 {
            return Err(Fault::Io);
        }
        pos += e.length;
        entries.push(e);
        if one {
            break;
        }
    }
    for (i, ctx) in contexts.iter().enumerate() {
        let mut descs: Vec<(u64, u32)> = Vec::new();
        for e in &entries {
            let v = ctx.value(e);
            match descs.last_mut() {
                Some((l, last)) if *last == v => *l += e.length,
                _ => descs.push((e.length, v)),
            }
        }
        let flags = if i + 1 == contexts.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        if framing.extended {
            // `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: a descriptor count, 64-bit lengths and
            // status values (the high half zero for both contexts).
            let ty = REPLY_TYPE_BLOCK_STATUS_EXT;
            chunk_header(out, framing, flags, ty, cookie, 8 + 16 * descs.len());
            out.put32(ctx.id());
            out.put32(u32::try_from(descs.len()).unwrap_or(u32::MAX));
            for (l, v) in descs {
                out.put64(l);
                out.put64(u64::from(v));
            }
            continue;
        }
        let ty = REPLY_TYPE_BLOCK_STATUS;
        chunk_header(out, framing, flags, ty, cookie, 4 + 8 * descs.len());
        out.put32(ctx.id());
        for (l, v) in descs {
            // Lengths are bounded by the request's 32-bit length.
            out.put32(u32::try_from(l).unwrap_or(u32::MAX));
            out.put32(v);
        }
    }
    Ok(())
}
