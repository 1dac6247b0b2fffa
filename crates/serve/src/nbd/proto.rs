//! NBD wire constants (the NBD protocol's `doc/proto.md`, section "Values") and the
//! big-endian helpers that build and parse its messages.

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic, also prefixing every client option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub(crate) const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server): fixed newstyle, and no 124 zero bytes after EXPORT_NAME.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags ("Transmission flags").
pub(crate) const TF_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const TF_READ_ONLY: u16 = 1 << 1;
pub(crate) const TF_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TF_SEND_FUA: u16 = 1 << 3;
pub(crate) const TF_SEND_TRIM: u16 = 1 << 5;
pub(crate) const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const TF_SEND_DF: u16 = 1 << 7;
pub(crate) const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub(crate) const TF_SEND_CACHE: u16 = 1 << 10;
pub(crate) const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options ("Option types").
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_STARTTLS: u32 = 5;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;
/// The `EXTENDED_HEADERS` extension (`doc/proto.md` of the NBD project's
/// `extension-ext-header` branch): 32-byte requests with 64-bit lengths, and every reply
/// a 32-byte extended chunk header.
pub(crate) const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option replies ("Option reply types").
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub(crate) const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub(crate) const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub(crate) const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub(crate) const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub(crate) const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub(crate) const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

/// `NBD_INFO_*` types.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// Requests ("Request message", "Request types").
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// An extended request (after `OPT_EXTENDED_HEADERS`): 32 bytes, 64-bit length.
pub(crate) const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_CACHE: u16 = 5;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub(crate) const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the length field is the payload's length (a write's data).
pub(crate) const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Replies.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub(crate) const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status with 64-bit extent lengths and status values (extended headers only).
pub(crate) const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` flags.
pub(crate) const STATE_HOLE: u32 = 1 << 0;
pub(crate) const STATE_ZERO: u32 = 1 << 1;

/// Size constraints we advertise (`NBD_INFO_BLOCK_SIZE`): any alignment, 4 KiB
/// preferred, 32 MiB payloads (the spec's default maximum).
pub(crate) const MIN_BLOCK: u32 = 1;
pub(crate) const PREFERRED_BLOCK: u32 = 4096;
pub(crate) const MAX_PAYLOAD: u32 = 32 << 20;

/// Longest option payload accepted during negotiation (names and queries are at most
/// 4 KiB each by the spec; a longer option is treated as an attack).
pub(crate) const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, context name) the spec allows.
pub(crate) const MAX_STRING: usize = 4096;

/// Appends big-endian fields to a message buffer.
pub(crate) trait Put {
    fn put16(&mut self, v: u16);
    fn put32(&mut self, v: u32);
    fn put64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

/// A bounds-checked reader over an option's payload: every take fails cleanly (`None`)
/// instead of reading past the end.
pub(crate) struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.bytes(2)?.try_into().ok().map(u16::from_be_bytes)
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.bytes(4)?.try_into().ok().map(u32::from_be_bytes)
    }
    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }
    /// A `u32` length followed by that many bytes.
    pub(crate) fn string(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.bytes(n)
    }
}

/// How replies are framed on a connection: structured chunks (20-byte header) or, with
/// extended headers, extended chunks (32 bytes, naming the request's offset).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Framing {
    /// Extended headers were negotiated.
    pub(crate) extended: bool,
    /// The request's offset (extended chunks repeat it).
    pub(crate) offset: u64,
}

/// A reply chunk header for a payload of `len` bytes, framed as `f` says.
pub(crate) fn chunk_header(
    out: &mut Vec<u8>,
    f: Framing,
    flags: u16,
    ty: u16,
    cookie: u64,
    len: usize,
) {
    out.put32(if f.extended {
        EXTENDED_REPLY_MAGIC
    } else {
        STRUCTURED_REPLY_MAGIC
    });
    out.put16(flags);
    out.put16(ty);
    out.put64(cookie);
    if f.extended {
        out.put64(f.offset);
        out.put64(u64::try_from(len).unwrap_or(u64::MAX));
    } else {
        out.put32(u32::try_from(len).unwrap_or(u32::MAX));
    }
}

/// A big-endian field of a fixed-size header (`N` bytes from `at`; zero when out of
/// range, which the fixed header sizes rule out).
pub(crate) fn be<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    buf.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}
