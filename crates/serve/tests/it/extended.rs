//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`, the NBD project's `extension-ext-header`
//! branch of `doc/proto.md`), byte by byte: 32-byte requests with 64-bit lengths, every
//! reply an extended chunk naming the request's offset, 64-bit block status. qemu-img and
//! qemu-io negotiate them as clients (crates/cli/tests/it/serve_ext.rs).

use std::io::Read;
use std::sync::Arc;

use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage,
};
use diskimg_serve::{Discard, ExportOptions};

use crate::Running;
use crate::client::*;

const OPT_EXTENDED: u32 = 11;
const EXT_REPLY: u32 = 0x6e8a_278c;
const PAYLOAD_LEN: u16 = 1 << 5;
const ERR_INVALID: u32 = (1 << 31) + 3;
const ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;
const EINVAL: u32 = 22;
const GIB: u64 = 1 << 30;

/// An empty qcow2 (64 KiB clusters) of `size` bytes in memory, however large.
fn mem_qcow2(size: u64) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
    diskimg_qcow2::DRIVER
        .create(s.clone(), &mut CreateRequest::new(size, OptionList::new()))
        .unwrap();
    diskimg_qcow2::DRIVER.open(s, &OpenOptions::new()).unwrap()
}

fn opts() -> ExportOptions {
    let mut o = ExportOptions::named("x");
    o.policy.discard = Discard::Unmap;
    o
}

/// One extended reply chunk: flags, type, payload.
type Chunk = (u16, u16, Vec<u8>);

/// Extended headers, both contexts, then GO; returns the transmission flags.
fn go_extended(c: &mut Client) -> u16 {
    assert_eq!(c.opt(OPT_EXTENDED, &[]).unwrap()[0].ty, 1);
    let mut m = 1u32.to_be_bytes().to_vec();
    m.extend_from_slice(b"x");
    m.extend_from_slice(&2u32.to_be_bytes());
    for q in ["base:allocation", "qemu:allocation-depth"] {
        m.extend_from_slice(&(q.len() as u32).to_be_bytes());
        m.extend_from_slice(q.as_bytes());
    }
    assert_eq!(c.opt(OPT_SET_META, &m).unwrap().len(), 3);
    let r = c.opt(OPT_GO, &go_data("x", &[])).unwrap();
    assert_eq!(r.last().unwrap().ty, 1, "{r:?}");
    let info = r.iter().find(|r| r.data[..2] == [0, 0]).unwrap();
    u16::from_be_bytes([info.data[10], info.data[11]])
}

/// Reads the chunks of one reply up to the one flagged done, checking that each
/// repeats the request's cookie and offset.
fn reply(c: &mut Client, cookie: u64, off: u64) -> Vec<Chunk> {
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 32];
        c.s.read_exact(&mut h).unwrap();
        let be64 = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().unwrap());
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), EXT_REPLY);
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let ty = u16::from_be_bytes([h[6], h[7]]);
        assert_eq!((be64(8), be64(16)), (cookie, off), "cookie and offset");
        let mut p = vec![0; be64(24) as usize];
        c.s.read_exact(&mut p).unwrap();
        out.push((flags, ty, p));
        if flags & 1 != 0 {
            return out;
        }
    }
}

/// The error of a one-chunk error reply.
fn error_of(chunks: &[Chunk]) -> u32 {
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!(chunks[0].1, 0x8001, "{chunks:?}");
    u32::from_be_bytes(chunks[0].2[..4].try_into().unwrap())
}

/// A successful reply without payload: one `NBD_REPLY_TYPE_NONE` chunk, done.
fn assert_none(chunks: &[Chunk]) {
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!((chunks[0].0, chunks[0].1, chunks[0].2.len()), (1, 0, 0));
}

#[test]
fn negotiation() {
    let srv = Running::start(mem_qcow2(GIB), opts(), 0);
    let mut c = Client::connect(srv.port, 3).unwrap();
    // No data allowed; then accepted once; structured replies after it are refused
    // with the error the extension defines.
    assert_eq!(c.opt(OPT_EXTENDED, b"x").unwrap()[0].ty, ERR_INVALID);
    assert_eq!(c.opt(OPT_STRUCTURED, &[]).unwrap()[0].ty, 1);
    assert_eq!(
        c.opt(OPT_EXTENDED, &[]).unwrap()[0].ty,
        1,
        "after structured"
    );
    assert_eq!(
        c.opt(OPT_EXTENDED, &[]).unwrap()[0].ty,
        ERR_INVALID,
        "twice"
    );
    assert_eq!(
        c.opt(OPT_STRUCTURED, &[]).unwrap()[0].ty,
        ERR_EXT_HEADER_REQD
    );
    // Without structured replies first, extended headers alone allow meta contexts
    // and DF.
    let mut c = Client::connect(srv.port, 3).unwrap();
    let flags = go_extended(&mut c);
    assert_ne!(flags & (1 << 7), 0, "SEND_DF");
    // A compact request (28 bytes, here with 4 more) is a protocol violation now: the
    // server hangs up.
    c.request(0, CMD_READ, 1, 0, 512, &[0; 4]);
    assert!(c.closed());
}

#[test]
fn commands_with_64_bit_lengths() {
    let srv = Running::start(mem_qcow2(8 * GIB), opts(), 0);
    let mut c = Client::connect(srv.port, 3).unwrap();
    go_extended(&mut c);
    // A write carries its payload length; the reply names its offset.
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let at = 5 * GIB + 4096;
    c.request_ext((PAYLOAD_LEN, CMD_WRITE), 1, at, 8192, &data);
    assert_none(&reply(&mut c, 1, at));
    // Read: one OFFSET_DATA chunk whose payload starts with the offset.
    c.request_ext((0, CMD_READ), 2, at, 8192, &[]);
    let r = reply(&mut c, 2, at);
    assert_eq!((r.len(), r[0].0, r[0].1), (1, 1, 1));
    assert_eq!(&r[0].2[..8], &at.to_be_bytes());
    assert_eq!(&r[0].2[8..], &data[..]);
    // No simple replies: flush and a zero-length read answer with NONE chunks.
    c.request_ext((0, CMD_FLUSH), 3, 0, 0, &[]);
    assert_none(&reply(&mut c, 3, 0));
    c.request_ext((0, CMD_READ), 4, 4096, 0, &[]);
    assert_none(&reply(&mut c, 4, 4096));
    // Block status over 6 GiB (more than 32 bits): 64-bit extent lengths, one chunk per
    // context, the descriptor count first.
    c.request_ext((0, CMD_BLOCK_STATUS), 5, 0, 6 * GIB, &[]);
    let r = reply(&mut c, 5, 0);
    assert_eq!(r.len(), 2, "{r:?}");
    let be32 = |p: &[u8], i: usize| u32::from_be_bytes(p[i..i + 4].try_into().unwrap());
    let be64 = |p: &[u8], i: usize| u64::from_be_bytes(p[i..i + 8].try_into().unwrap());
    for (i, (flags, ty, p)) in r.iter().enumerate() {
        assert_eq!((*flags, *ty), (u16::from(i == 1), 6), "BLOCK_STATUS_EXT");
        let n = be32(p, 4) as usize;
        assert_eq!(p.len(), 8 + 16 * n);
        let descs: Vec<(u64, u64)> = (0..n)
            .map(|k| (be64(p, 8 + 16 * k), be64(p, 16 + 16 * k)))
            .collect();
        assert_eq!(descs[0].0, 5 * GIB, "first extent past 4 GiB: {descs:?}");
        assert_eq!(descs[1].0, 64 << 10, "{descs:?}");
        let want = if be32(p, 0) == 0 { [3, 0] } else { [0, 1] };
        assert_eq!([descs[0].1, descs[1].1], want, "context {}", be32(p, 0));
    }
    // Write-zeroes and trim with effect lengths over 4 GiB.
    c.request_ext((0, CMD_WRITE_ZEROES), 6, 0, 5 * GIB, &[]);
    assert_none(&reply(&mut c, 6, 0));
    c.request_ext((0, CMD_TRIM), 7, GIB, 7 * GIB, &[]);
    assert_none(&reply(&mut c, 7, GIB));
    c.request_ext((0, CMD_READ), 8, at, 8192, &[]);
    assert!(reply(&mut c, 8, at)[0].2[8..].iter().all(|&b| b == 0));
    // Beyond the end: an error, not a hang.
    c.request_ext((0, CMD_WRITE_ZEROES), 9, 7 * GIB, 2 * GIB, &[]);
    assert_ne!(error_of(&reply(&mut c, 9, 7 * GIB)), 0);
}

#[test]
fn payload_framing_errors() {
    let srv = Running::start(mem_qcow2(GIB), opts(), 0);
    let mut c = Client::connect(srv.port, 3).unwrap();
    go_extended(&mut c);
    // A write whose payload is not announced still carries it (as qemu's client sends
    // writes, and qemu-nbd takes them).
    c.request_ext((0, CMD_WRITE), 1, 0, 4, b"wxyz");
    assert_none(&reply(&mut c, 1, 0));
    // A payload on a command that takes none is read past and refused; the stream
    // stays in step.
    c.request_ext((PAYLOAD_LEN, CMD_TRIM), 2, 0, 16, &[7; 16]);
    assert_eq!(error_of(&reply(&mut c, 2, 0)), EINVAL);
    c.request_ext((PAYLOAD_LEN, CMD_WRITE), 3, 512, 3, b"abc");
    assert_none(&reply(&mut c, 3, 512));
    c.request_ext((0, CMD_READ), 4, 0, 515, &[]);
    let r = reply(&mut c, 4, 0);
    assert_eq!(
        (&r[0].2[8..12], &r[0].2[8 + 512..]),
        (&b"wxyz"[..], &b"abc"[..])
    );
    // A payload over the advertised maximum (32 MiB): an error, then the server hangs up.
    c.request_ext((PAYLOAD_LEN, CMD_WRITE), 5, 0, (32 << 20) + 1, &[]);
    assert_eq!(error_of(&reply(&mut c, 5, 0)), EINVAL);
    assert!(c.closed());
}
