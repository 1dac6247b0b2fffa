//! Hostile and broken clients get protocol errors or a closed connection; the server
//! never panics, never stalls the other clients, and flushes the image on shutdown.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use diskimg_serve::ExportOptions;

use crate::client::*;
use crate::{Running, mem_raw};

/// A healthy client can still read and write.
fn healthy(port: u16) {
    let mut c = Client::connect(port, 3).unwrap();
    c.go("");
    c.request(0, CMD_WRITE, 1, 4096, 512, &[7; 512]);
    assert_eq!(c.reply(1, 0).unwrap().error, 0);
    c.request(0, CMD_READ, 2, 4096, 512, &[]);
    assert_eq!(c.reply(2, 0).unwrap().data, vec![7; 512]);
    c.request(0, CMD_DISC, 3, 0, 0, &[]);
}

#[test]
fn broken_negotiation_closes_or_errors() {
    let srv = Running::start(mem_raw(1 << 20), ExportOptions::default(), 0);
    // Unknown client flags: the spec says drop the connection.
    let mut c = Client::connect(srv.port, 0x80).unwrap();
    assert!(c.closed());
    // Wrong option magic.
    let mut c = Client::connect(srv.port, 3).unwrap();
    c.s.write_all(&[0xde; 16]).unwrap();
    assert!(c.closed());
    // An option claiming 1 GiB of data.
    let mut c = Client::connect(srv.port, 3).unwrap();
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.s.write_all(&m).unwrap();
    assert!(c.closed());
    // Malformed GO / meta-context payloads are invalid, and the session goes on.
    let mut c = Client::connect(srv.port, 3).unwrap();
    for bad in [
        &[0, 0, 0, 9, b'a'][..],       // name longer than the data
        &[0, 0, 0, 0, 0, 5, 0, 1][..], // five requests announced, one sent
        &[0, 0, 0, 0, 0, 0, 0, 0][..], // trailing bytes
        &[0xff, 0xff, 0xff, 0xff][..], // absurd name length
    ] {
        let r = c.opt(OPT_GO, bad).unwrap();
        assert_eq!(r[0].ty, (1 << 31) + 3, "{bad:?}");
    }
    assert_eq!(c.opt(OPT_STRUCTURED, &[]).unwrap()[0].ty, 1);
    // A query count far beyond what the data can hold.
    let r = c
        .opt(OPT_SET_META, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    assert_eq!(r[0].ty, (1 << 31) + 3);
    // Truncated query.
    let r = c
        .opt(OPT_SET_META, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 20, b'b'])
        .unwrap();
    assert_eq!(r[0].ty, (1 << 31) + 3);
    // Unknown contexts are ignored (no context selected, ACK only).
    let mut q = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9];
    q.extend_from_slice(b"x-foo:bar");
    let r = c.opt(OPT_SET_META, &q).unwrap();
    assert_eq!((r.len(), r[0].ty), (1, 1));
    let r = c.opt(OPT_GO, &go_data("", &[])).unwrap();
    assert_eq!(r.last().unwrap().ty, 1);
    // No context selected: block status is invalid, the connection survives.
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 512, &[]);
    assert_eq!(c.reply(1, 0).unwrap().error, 22);
    healthy(srv.port);
    srv.stop();
}

#[test]
fn bad_requests_get_errors() {
    let srv = Running::start(mem_raw(1 << 20), ExportOptions::default(), 0);
    let mut c = Client::connect(srv.port, 3).unwrap();
    c.go("");
    let size = 1u64 << 20;
    // Out of range: read/trim/block status EINVAL, write/zero ENOSPC (payload consumed).
    c.request(0, CMD_READ, 1, size - 512, 1024, &[]);
    assert_eq!(c.reply(1, 0).unwrap().error, 22);
    c.request(0, CMD_READ, 2, u64::MAX - 10, 512, &[]);
    assert_eq!(c.reply(2, 0).unwrap().error, 22);
    c.request(0, CMD_WRITE, 3, size, 4096, &[9; 4096]);
    assert_eq!(c.reply(3, 0).unwrap().error, 28);
    c.request(0, CMD_WRITE_ZEROES, 4, size - 1, 2, &[]);
    assert_eq!(c.reply(4, 0).unwrap().error, 28);
    c.request(0, CMD_TRIM, 5, size, 1, &[]);
    assert_eq!(c.reply(5, 0).unwrap().error, 22);
    c.request(0, CMD_BLOCK_STATUS, 6, size, 1, &[]);
    assert_eq!(c.reply(6, 0).unwrap().error, 22);
    // Unknown command, flags not valid for the command, flush with a range.
    c.request(0, 42, 7, 0, 0, &[]);
    assert_eq!(c.reply(7, 0).unwrap().error, 22);
    c.request(1 << 3, CMD_READ, 8, 0, 512, &[]);
    assert_eq!(c.reply(8, 0).unwrap().error, 22);
    c.request(1 << 9, CMD_WRITE_ZEROES, 9, 0, 512, &[]);
    assert_eq!(c.reply(9, 0).unwrap().error, 22);
    c.request(0, CMD_FLUSH, 10, 1, 0, &[]);
    assert_eq!(c.reply(10, 0).unwrap().error, 22);
    // A read larger than the maximum payload: EOVERFLOW with structured replies.
    c.request(0, CMD_READ, 11, 0, 64 << 20, &[]);
    assert_eq!(c.reply(11, 0).unwrap().error, 75);
    // Fast zero on a raw image works; still usable.
    c.request(1 << 4, CMD_WRITE_ZEROES, 12, 0, 4096, &[]);
    assert_eq!(c.reply(12, 0).unwrap().error, 0);
    c.request(0, CMD_READ, 13, 0, 512, &[]);
    assert_eq!(c.reply(13, 0).unwrap().error, 0);
    // A write announcing 64 MiB: answered with an error, then the server hangs up.
    c.request(0, CMD_WRITE, 14, 0, 64 << 20, &[]);
    assert_eq!(c.reply(14, 0).unwrap().error, 22);
    assert!(c.closed());
    // Bad request magic: hard disconnect.
    let mut c = Client::connect(srv.port, 3).unwrap();
    c.go("");
    c.s.write_all(&[0x11; 28]).unwrap();
    assert!(c.closed());
    healthy(srv.port);
    srv.stop();
}

#[test]
fn disconnects_mid_request_leave_others_alone() {
    let srv = Running::start(mem_raw(4 << 20), ExportOptions::default(), 0);
    // Half a header, then gone.
    let mut c = Client::connect(srv.port, 3).unwrap();
    c.go("");
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(c);
    // A 1 MiB write with 100 bytes of payload, then gone: nothing of it is written.
    let mut c = Client::connect(srv.port, 3).unwrap();
    c.go("");
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&[0, 0, 0, 1]);
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
    m.extend_from_slice(&[0xee; 100]);
    c.s.write_all(&m).unwrap();
    drop(c);
    // Mid-negotiation.
    let mut c = Client::connect(srv.port, 3).unwrap();
    c.send_opt(OPT_STRUCTURED, &[]).unwrap();
    drop(c);
    healthy(srv.port);
    let mut c = Client::connect(srv.port, 3).unwrap();
    c.go("");
    c.request(0, CMD_READ, 1, 0, 100, &[]);
    assert_eq!(c.reply(1, 0).unwrap().data, vec![0; 100]);
    srv.stop();
}

#[test]
fn hundreds_of_connections() {
    let srv = Running::start(mem_raw(4 << 20), ExportOptions::default(), 0);
    let n = 300u64;
    let mut clients: Vec<Client> = (0..n)
        .map(|_| Client::connect(srv.port, 3).unwrap())
        .collect();
    for c in &mut clients {
        c.go("");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let i = i as u64;
        c.request(0, CMD_WRITE, i, i * 4096, 4096, &[i as u8; 4096]);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.reply(i as u64, 0).unwrap().error, 0);
    }
    // Every connection sees every other's completed writes (multi-conn).
    for (i, c) in clients.iter_mut().enumerate() {
        let j = (i as u64 + 1) % n;
        c.request(0, CMD_READ, j, j * 4096, 4096, &[]);
        assert_eq!(c.reply(j, 0).unwrap().data, vec![j as u8; 4096]);
    }
    assert!(srv.device.dirty.load(Ordering::SeqCst));
    // Shutdown with every connection open: all close, the image is flushed.
    srv.stop();
    assert!(
        !srv.device.dirty.load(Ordering::SeqCst),
        "unflushed at exit"
    );
    for c in &mut clients {
        assert!(c.closed());
    }
}

#[test]
fn connection_limit_and_silent_clients() {
    let srv = Running::start(mem_raw(1 << 20), ExportOptions::default(), 2);
    // A client that connects and says nothing holds a slot only until the handshake
    // limit (2 s here).
    let silent = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    let mut a = Client::connect(srv.port, 3).unwrap();
    a.go("");
    // The third connection waits in the backlog (no greeting yet) ...
    let t = Instant::now();
    let mut b = Client::connect(srv.port, 3).unwrap();
    // ... and is greeted once the silent one is dropped by the server.
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    b.go("");
    b.request(0, CMD_READ, 1, 0, 512, &[]);
    assert_eq!(b.reply(1, 0).unwrap().error, 0);
    drop(silent);
    srv.stop();
}
