//! Negotiation and commands as the NBD spec words them, byte by byte.

use std::io::Read;

use diskimg_serve::{Discard, ExportOptions};

use crate::client::*;
use crate::{Running, mem_raw};

fn opts(name: &str) -> ExportOptions {
    let mut o = ExportOptions::named(name);
    o.description = "test disk".into();
    o.policy.discard = Discard::Unmap;
    o
}

#[test]
fn negotiation_options() {
    let srv = Running::start(mem_raw(1 << 20), opts("disk"), 0);
    let mut c = Client::connect(srv.port, 3).unwrap();
    // LIST: the one export with its description, then ACK.
    let r = c.opt(3, &[]).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].ty, 2);
    assert_eq!(&r[0].data[..4], &4u32.to_be_bytes());
    assert_eq!(&r[0].data[4..], b"disktest disk");
    // LIST with data is invalid; STARTTLS is refused by policy; unknown options unsupported.
    assert_eq!(c.opt(3, b"x").unwrap()[0].ty, (1 << 31) + 3);
    assert_eq!(c.opt(5, &[]).unwrap()[0].ty, (1 << 31) + 2);
    assert_eq!(c.opt(99, b"abc").unwrap()[0].ty, (1 << 31) + 1);
    // INFO on an unknown name, then on the right one with NAME/DESCRIPTION/BLOCK_SIZE.
    assert_eq!(
        c.opt(6, &go_data("nope", &[])).unwrap()[0].ty,
        (1 << 31) + 6
    );
    let r = c.opt(6, &go_data("disk", &[1, 2, 3])).unwrap();
    let infos: Vec<u16> = r[..r.len() - 1]
        .iter()
        .map(|i| u16::from_be_bytes([i.data[0], i.data[1]]))
        .collect();
    assert_eq!(infos, [0, 1, 2, 3]);
    assert_eq!(r[0].data.len(), 12);
    assert_eq!(&r[0].data[2..10], &(1u64 << 20).to_be_bytes());
    let flags = u16::from_be_bytes([r[0].data[10], r[0].data[11]]);
    // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN,
    // SEND_CACHE, SEND_FAST_ZERO; no DF before structured replies are negotiated.
    assert_eq!(flags, 1 | 4 | 8 | 32 | 64 | 256 | 1024 | 2048);
    assert_eq!(&r[3].data[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
    // Metadata contexts need structured replies first.
    assert_eq!(c.opt(9, &[0; 8]).unwrap()[0].ty, (1 << 31) + 3);
    assert_eq!(c.opt(8, &[]).unwrap()[0].ty, 1);
    assert_eq!(c.opt(8, &[]).unwrap()[0].ty, (1 << 31) + 3, "twice");
    // LIST_META_CONTEXT with no query lists both; "base:" lists base:allocation only.
    let mut q = 4u32.to_be_bytes().to_vec();
    q.extend_from_slice(b"disk");
    q.extend_from_slice(&0u32.to_be_bytes());
    let r = c.opt(9, &q).unwrap();
    let names: Vec<&[u8]> = r[..r.len() - 1].iter().map(|r| &r.data[4..]).collect();
    assert_eq!(names, [&b"base:allocation"[..], b"qemu:allocation-depth"]);
    q.truncate(8);
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&5u32.to_be_bytes());
    q.extend_from_slice(b"base:");
    let r = c.opt(9, &q).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    // ABORT is acknowledged and the server hangs up.
    assert_eq!(c.opt(2, &[]).unwrap()[0].ty, 1);
    assert!(c.closed());
    srv.stop();
}

#[test]
fn export_name_with_and_without_zeroes() {
    let srv = Running::start(mem_raw(4096), opts(""), 0);
    for (flags, len) in [(1u32, 134usize), (3, 10)] {
        let mut c = Client::connect(srv.port, flags).unwrap();
        c.send_opt(1, b"").unwrap();
        let mut m = vec![0u8; len];
        c.s.read_exact(&mut m).unwrap();
        assert_eq!(&m[..8], &4096u64.to_be_bytes());
        // Simple replies only: a read answers with the simple magic and the data.
        c.request(0, CMD_READ, 7, 0, 512, &[]);
        let r = c.reply(7, 512).unwrap();
        assert_eq!((r.error, r.data.len(), r.chunks.len()), (0, 512, 0));
        c.request(0, CMD_DISC, 8, 0, 0, &[]);
        assert!(c.closed());
    }
    // A wrong name ends the session (EXPORT_NAME cannot report errors).
    let mut c = Client::connect(srv.port, 3).unwrap();
    c.send_opt(1, b"other").unwrap();
    assert!(c.closed());
    srv.stop();
}

#[test]
fn commands_and_block_status() {
    let srv = Running::start(mem_raw(1 << 20), opts("d"), 0);
    let mut c = Client::connect(srv.port, 3).unwrap();
    assert_eq!(c.go("d"), 1 << 20);
    let data = vec![0x5au8; 8192];
    c.request(1, CMD_WRITE, 1, 65536, 8192, &data); // FUA
    assert_eq!(c.reply(1, 0).unwrap().error, 0);
    c.request(0, CMD_READ, 2, 65536 - 512, 1024, &[]);
    let r = c.reply(2, 0).unwrap();
    assert_eq!(r.chunks.len(), 1, "one data chunk, flagged done");
    assert_eq!(&r.chunks[0].2[..8], &(65536u64 - 512).to_be_bytes());
    assert_eq!(&r.data[..512], &[0u8; 512][..]);
    assert_eq!(&r.data[512..], &[0x5a; 512][..]);
    // Block status: one chunk per context (memory storage has no holes: all data).
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 1 << 20, &[]);
    let r = c.reply(3, 0).unwrap();
    assert_eq!(r.chunks.len(), 2);
    assert_eq!(r.chunks[0].0, 0, "first chunk not done");
    assert_eq!(r.chunks[1].0, 1, "last chunk done");
    let base = descs(&r.chunks[0].2);
    assert_eq!(base.0, 0);
    assert_eq!(base.1, [(1 << 20, 0)]);
    assert_eq!(
        descs(&r.chunks[1].2),
        (1, vec![(1 << 20, 1)]),
        "depth 1: top layer"
    );
    // REQ_ONE: exactly one extent, never longer than asked.
    c.request(8, CMD_BLOCK_STATUS, 4, 0, 4096, &[]);
    let r = c.reply(4, 0).unwrap();
    assert_eq!(descs(&r.chunks[0].2).1, [(4096, 0)]);
    // Write zeroes / trim / flush succeed; the zeroed range reads back as zeroes.
    c.request(0, CMD_WRITE_ZEROES, 5, 65536, 4096, &[]);
    assert_eq!(c.reply(5, 0).unwrap().error, 0);
    c.request(0, CMD_TRIM, 6, 69632, 4096, &[]);
    assert_eq!(c.reply(6, 0).unwrap().error, 0);
    c.request(0, CMD_FLUSH, 7, 0, 0, &[]);
    assert_eq!(c.reply(7, 0).unwrap().error, 0);
    c.request(0, CMD_READ, 8, 65536, 4096, &[]);
    assert_eq!(c.reply(8, 0).unwrap().data, vec![0u8; 4096]);
    // A zero-length read is answered with a lone NONE chunk.
    c.request(0, CMD_READ, 9, 0, 0, &[]);
    let r = c.reply(9, 0).unwrap();
    assert_eq!((r.chunks.len(), r.chunks[0].1), (1, 0));
    c.request(0, CMD_DISC, 10, 0, 0, &[]);
    assert!(c.closed());
    srv.stop();
}

/// A block-status chunk's context id and (length, flags) pairs.
pub fn descs(p: &[u8]) -> (u32, Vec<(u32, u32)>) {
    let id = u32::from_be_bytes(p[..4].try_into().unwrap());
    let d = p[4..]
        .chunks(8)
        .map(|c| {
            (
                u32::from_be_bytes(c[..4].try_into().unwrap()),
                u32::from_be_bytes(c[4..].try_into().unwrap()),
            )
        })
        .collect();
    (id, d)
}

#[test]
fn read_only_export_refuses_writes() {
    let mut o = opts("ro");
    o.read_only = true;
    let srv = Running::start(mem_raw(1 << 16), o, 0);
    let mut c = Client::connect(srv.port, 3).unwrap();
    c.go("ro");
    c.request(0, CMD_WRITE, 1, 0, 512, &[1; 512]);
    assert_eq!(c.reply(1, 0).unwrap().error, 1, "EPERM");
    c.request(0, CMD_TRIM, 2, 0, 512, &[]);
    assert_eq!(c.reply(2, 0).unwrap().error, 1);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 512, &[]);
    assert_eq!(c.reply(3, 0).unwrap().error, 1);
    c.request(0, CMD_READ, 4, 0, 512, &[]);
    assert_eq!(c.reply(4, 0).unwrap().data, vec![0; 512]);
    srv.stop();
}
