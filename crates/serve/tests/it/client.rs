//! A deliberately small NBD client speaking raw bytes, so tests can send what real
//! clients never would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE: u32 = 0x6744_6698;
pub const STRUCTURED: u32 = 0x668e_33ef;

pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED: u32 = 8;
pub const OPT_SET_META: u32 = 10;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub struct Client {
    pub s: TcpStream,
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub ty: u32,
    pub data: Vec<u8>,
}

/// A reply: simple (error, data) or the chunks of a structured one.
#[derive(Debug, Default)]
pub struct Reply {
    pub error: u32,
    pub data: Vec<u8>,
    /// Structured chunks: (flags, type, payload).
    pub chunks: Vec<(u16, u16, Vec<u8>)>,
}

impl Client {
    /// Connects and reads the server greeting; sends `client_flags`.
    pub fn connect(port: u16, client_flags: u32) -> std::io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut c = Client { s };
        let mut hello = [0u8; 18];
        c.s.read_exact(&mut hello)?;
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        c.s.write_all(&client_flags.to_be_bytes())?;
        Ok(c)
    }

    pub fn send_opt(&mut self, opt: u32, data: &[u8]) -> std::io::Result<()> {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m)
    }

    pub fn opt_reply(&mut self) -> std::io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0; len];
        self.s.read_exact(&mut data)?;
        Ok(OptReply { ty, data })
    }

    /// Replies to one option until the final one (ACK or error).
    pub fn opt(&mut self, opt: u32, data: &[u8]) -> std::io::Result<Vec<OptReply>> {
        self.send_opt(opt, data)?;
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply()?;
            let last = r.ty == 1 || r.ty & (1 << 31) != 0;
            out.push(r);
            if last {
                return Ok(out);
            }
        }
    }

    /// Structured replies, both contexts, then GO on `name`. Returns the export size.
    pub fn go(&mut self, name: &str) -> u64 {
        let r = self.opt(OPT_STRUCTURED, &[]).unwrap();
        assert_eq!(r[0].ty, 1);
        let mut m = (name.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(name.as_bytes());
        m.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:allocation-depth"] {
            m.extend_from_slice(&(q.len() as u32).to_be_bytes());
            m.extend_from_slice(q.as_bytes());
        }
        let r = self.opt(OPT_SET_META, &m).unwrap();
        assert_eq!(r.len(), 3, "{r:?}");
        let r = self.opt(OPT_GO, &go_data(name, &[])).unwrap();
        assert_eq!(r.last().unwrap().ty, 1, "{r:?}");
        let info = r.iter().find(|r| r.data[..2] == [0, 0]).unwrap();
        u64::from_be_bytes(info.data[2..10].try_into().unwrap())
    }

    pub fn request(&mut self, flags: u16, ty: u16, cookie: u64, off: u64, len: u32, data: &[u8]) {
        self.send_request(
            REQUEST_MAGIC,
            (flags, ty),
            cookie,
            off,
            &len.to_be_bytes(),
            data,
        );
    }

    /// An extended request (32 bytes, 64-bit length; after `NBD_OPT_EXTENDED_HEADERS`).
    pub fn request_ext(
        &mut self,
        (flags, ty): (u16, u16),
        cookie: u64,
        off: u64,
        len: u64,
        data: &[u8],
    ) {
        self.send_request(
            EXT_REQUEST_MAGIC,
            (flags, ty),
            cookie,
            off,
            &len.to_be_bytes(),
            data,
        );
    }

    fn send_request(
        &mut self,
        magic: u32,
        (flags, ty): (u16, u16),
        cookie: u64,
        off: u64,
        len: &[u8],
        data: &[u8],
    ) {
        let mut m = magic.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&off.to_be_bytes());
        m.extend_from_slice(len);
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// Reads one whole reply (a structured one up to its DONE chunk); `read_len` is the
    /// data length of a simple read reply.
    pub fn reply(&mut self, cookie: u64, read_len: usize) -> std::io::Result<Reply> {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic)?;
        let mut r = Reply::default();
        match u32::from_be_bytes(magic) {
            SIMPLE => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h)?;
                r.error = u32::from_be_bytes(h[..4].try_into().unwrap());
                assert_eq!(u64::from_be_bytes(h[4..].try_into().unwrap()), cookie);
                if r.error == 0 {
                    r.data = vec![0; read_len];
                    self.s.read_exact(&mut r.data)?;
                }
                Ok(r)
            }
            STRUCTURED => loop {
                if !r.chunks.is_empty() {
                    self.s.read_exact(&mut magic)?;
                    assert_eq!(u32::from_be_bytes(magic), STRUCTURED);
                }
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h)?;
                let flags = u16::from_be_bytes(h[..2].try_into().unwrap());
                let ty = u16::from_be_bytes(h[2..4].try_into().unwrap());
                assert_eq!(u64::from_be_bytes(h[4..12].try_into().unwrap()), cookie);
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
                let mut p = vec![0; len];
                self.s.read_exact(&mut p)?;
                if ty & 0x8000 != 0 {
                    r.error = u32::from_be_bytes(p[..4].try_into().unwrap());
                } else if ty == 1 {
                    r.data.extend_from_slice(&p[8..]);
                }
                r.chunks.push((flags, ty, p));
                if flags & 1 != 0 {
                    return Ok(r);
                }
            },
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    /// Whether the server closed the connection (reads EOF or reset within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// The data of an `NBD_OPT_GO`/`INFO` for `name` with information requests `reqs`.
pub fn go_data(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut m = (name.len() as u32).to_be_bytes().to_vec();
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        m.extend_from_slice(&r.to_be_bytes());
    }
    m
}
