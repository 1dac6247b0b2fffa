//! The NBD server (`crates/serve` nbd/) fed an arbitrary client byte stream over a unix
//! socket: negotiation options, then transmission-phase requests (reads, writes with
//! payloads, zeroes, trims, block status, cache, disconnect) against a 1 MiB raw or qcow2
//! export in memory. The client writes the whole input and closes its side; the server
//! must answer or disconnect without panicking, hanging or allocating without bound.
//!
//! Input layout: `[mode][stream…]`. Mode bit 0 clear: the stream starts right after the
//! server's greeting (negotiation is fuzzed). Bit 0 set: the target negotiates first
//! (client flags, structured replies if bit 1, `base:allocation` and
//! `qemu:allocation-depth` contexts if bit 2, then `NBD_OPT_GO`) and the stream is the
//! transmission phase. Bit 3 exports a qcow2 image instead of raw; bit 4 exports it
//! read-only; bit 5 sets `discard=unmap` and `detect-zeroes=unmap`; bit 6 writethrough.
#![no_main]
use diskimg_blockio::{
    BlockDevice, CreateRequest, Driver, MemStorage, OpenOptions, OptionList, Storage,
};
use diskimg_serve::{
    CacheMode, DetectZeroes, Discard, Export, ExportOptions, Listener, NbdConfig, NbdServer,
    Shutdown,
};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

const SIZE: u64 = 1 << 20;
const IHAVEOPT: &[u8] = b"IHAVEOPT";

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(IHAVEOPT);
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The client's side of a negotiation ending in `NBD_OPT_GO` for the default export.
fn negotiation(mode: u8) -> Vec<u8> {
    let mut out = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    if mode & 2 != 0 {
        option(&mut out, 8, &[]);
    }
    if mode & 4 != 0 {
        let mut d = 0u32.to_be_bytes().to_vec(); // export name "" (the default)
        let queries: [&[u8]; 2] = [b"base:allocation", b"qemu:allocation-depth"];
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        option(&mut out, 10, &d);
    }
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut out, 7, &go);
    out
}

struct Scratch {
    dir: tempfile::TempDir,
    qcow2: Vec<u8>,
    next: AtomicU64,
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| {
        // A peer that closes early must not kill the process (the CLI's runtime ignores
        // SIGPIPE; libFuzzer's main does not).
        // SAFETY: setting a signal disposition to SIG_IGN, before any thread of ours runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let mut o = OptionList::new();
        o.set("cluster_size", "4096");
        diskimg_qcow2::DRIVER
            .create(storage.clone(), &mut CreateRequest::new(SIZE, o))
            .expect("create qcow2");
        let dev = diskimg_qcow2::DRIVER
            .open(storage.clone(), &OpenOptions::new())
            .unwrap();
        dev.write_at(&[0x5a; 8192], 4096).unwrap();
        dev.close().unwrap();
        let mut qcow2 = vec![0u8; storage.len().unwrap() as usize];
        storage.read_exact_at(&mut qcow2, 0).unwrap();
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
            qcow2,
            next: AtomicU64::new(0),
        }
    })
}

fn device(mode: u8, s: &Scratch) -> Option<Arc<dyn BlockDevice>> {
    let ro = OpenOptions::new().read_only(mode & 16 != 0);
    if mode & 8 != 0 {
        let storage = Arc::new(MemStorage::from_vec(s.qcow2.clone()));
        diskimg_qcow2::DRIVER.open(storage, &ro).ok()
    } else {
        let storage = Arc::new(MemStorage::from_vec(vec![0x11; SIZE as usize]));
        diskimg_raw::DRIVER.open(storage, &ro).ok()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let s = scratch();
    let Some(dev) = device(mode, s) else {
        return;
    };
    let mut input = if mode & 1 != 0 {
        negotiation(mode)
    } else {
        Vec::new()
    };
    input.extend_from_slice(stream);
    let path = s
        .dir
        .path()
        .join(format!("s{}", s.next.fetch_add(1, Ordering::Relaxed)));
    let listener = Listener::unix(&path).expect("listen");
    let mut options = ExportOptions::named("");
    if mode & 32 != 0 {
        options.policy.discard = Discard::Unmap;
        options.policy.detect_zeroes = DetectZeroes::Unmap;
    }
    if mode & 64 != 0 {
        options.policy.cache = CacheMode::Writethrough;
    }
    let server = NbdServer::new(Arc::new(Export::new(dev, options)), NbdConfig::default());
    let shutdown = Shutdown::new();
    let serving = std::thread::spawn(move || {
        let _ = server.serve(&listener, &shutdown);
    });
    let client = UnixStream::connect(&path).expect("connect");
    let mut writer = client.try_clone().expect("clone");
    let feeding = std::thread::spawn(move || {
        let _ = writer.write_all(&input);
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    // Replies are read (and dropped) until the server closes the connection.
    let mut buf = vec![0u8; 64 << 10];
    while matches!((&client).read(&mut buf), Ok(n) if n > 0) {}
    drop(client);
    let _ = feeding.join();
    let _ = serving.join();
    let _ = std::fs::remove_file(&path);
});
