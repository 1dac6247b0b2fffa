//! Fixed newstyle negotiation ("Handshake" and "Option types" in the NBD spec): the
//! options a client sends before the transmission phase, and what they select.

use std::io::{self, Read, Write};
use std::time::Instant;

use super::proto::*;
use super::status::Context;
use super::{NbdConfig, Session};
use crate::export::Export;
use crate::listen::Shutdown;

/// How many options one client may send before it is considered hostile.
const MAX_OPTIONS: usize = 1024;

/// What the negotiation ended with.
pub(crate) enum Outcome {
    /// Enter transmission with these settings.
    Transmit(Session),
    /// The client aborted or broke the protocol: close the connection.
    Close,
}

struct Haggle<'a, S> {
    s: &'a mut S,
    export: &'a Export,
    config: &'a NbdConfig,
    shutdown: &'a Shutdown,
    session: Session,
    /// The export name the last `SET_META_CONTEXT` named.
    meta_export: Option<Vec<u8>>,
}

/// Runs the handshake on `s`, answering options until the client picks the export
/// (`EXPORT_NAME`/`GO`), aborts, or breaks the protocol.
pub(crate) fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &Export,
    config: &NbdConfig,
    shutdown: &Shutdown,
) -> io::Result<Outcome> {
    let start = Instant::now();
    let mut hello = Vec::new();
    hello.put64(NBDMAGIC);
    hello.put64(IHAVEOPT);
    hello.put16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&hello)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Ok(Outcome::Close);
    }
    let mut h = Haggle {
        s,
        export,
        config,
        shutdown,
        session: Session {
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            ..Session::default()
        },
        meta_export: None,
    };
    for _ in 0..MAX_OPTIONS {
        if start.elapsed() > config.handshake_limit {
            return Ok(Outcome::Close);
        }
        let mut hdr = [0u8; 16];
        h.s.read_exact(&mut hdr)?;
        let (magic, opt, len) = (
            u64::from_be_bytes(be(&hdr, 0)),
            u32::from_be_bytes(be(&hdr, 8)),
            u32::from_be_bytes(be(&hdr, 12)),
        );
        if magic != IHAVEOPT || len > MAX_OPTION_LEN {
            return Ok(Outcome::Close);
        }
        let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
        h.s.read_exact(&mut data)?;
        if let Some(out) = h.option(opt, &data)? {
            return Ok(out);
        }
    }
    Ok(Outcome::Close)
}

impl<S: Read + Write> Haggle<'_, S> {
    /// Answers one option; `Some` ends the negotiation.
    fn option(&mut self, opt: u32, data: &[u8]) -> io::Result<Option<Outcome>> {
        if self.shutdown.is_triggered() && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(Some(Outcome::Close));
            }
            self.error(opt, REP_ERR_SHUTDOWN, "server is shutting down")?;
            return Ok(None);
        }
        match opt {
            OPT_EXPORT_NAME => return self.export_name(data).map(Some),
            OPT_ABORT => {
                self.reply(opt, REP_ACK, &[])?;
                return Ok(Some(Outcome::Close));
            }
            OPT_LIST => self.list(data)?,
            OPT_STARTTLS if data.is_empty() => {
                self.error(opt, REP_ERR_POLICY, "TLS is not configured")?;
            }
            OPT_INFO | OPT_GO => return self.info(opt, data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(opt, REP_ERR_INVALID, "option takes no data")?;
                } else if self.session.extended {
                    self.error(opt, REP_ERR_EXT_HEADER_REQD, "extended headers already on")?;
                } else if self.session.structured {
                    self.error(opt, REP_ERR_INVALID, "structured replies already on")?;
                } else {
                    self.session.structured = true;
                    self.reply(opt, REP_ACK, &[])?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    self.error(opt, REP_ERR_INVALID, "option takes no data")?;
                } else if self.session.extended {
                    self.error(opt, REP_ERR_INVALID, "extended headers already on")?;
                } else {
                    // Takes the place of structured replies (which may be on already).
                    self.session.extended = true;
                    self.session.structured = true;
                    self.reply(opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta(opt, data)?,
            OPT_STARTTLS => self.error(opt, REP_ERR_INVALID, "option takes no data")?,
            _ => self.error(opt, REP_ERR_UNSUP, "option not supported")?,
        }
        Ok(None)
    }

    fn reply(&mut self, opt: u32, ty: u32, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::new();
        m.put64(REPLY_MAGIC);
        m.put32(opt);
        m.put32(ty);
        m.put32(u32::try_from(data.len()).unwrap_or(0));
        m.extend_from_slice(data);
        self.s.write_all(&m)
    }

    fn error(&mut self, opt: u32, ty: u32, msg: &str) -> io::Result<()> {
        self.reply(opt, ty, msg.as_bytes())
    }

    fn flags(&self) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
        if self.export.read_only() {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        if self.session.structured {
            f |= TF_SEND_DF;
        }
        if self.config.multi_conn() {
            f |= TF_CAN_MULTI_CONN;
        }
        f
    }

    /// Contexts stay selected only for the export they were set for.
    fn finish(&mut self, name: &[u8]) -> Outcome {
        if self.meta_export.as_deref() != Some(name) {
            self.session.contexts.clear();
        }
        self.session.flags = self.flags();
        Outcome::Transmit(std::mem::take(&mut self.session))
    }

    fn export_name(&mut self, name: &[u8]) -> io::Result<Outcome> {
        if name != self.export.name().as_bytes() {
            return Ok(Outcome::Close);
        }
        let mut m = Vec::new();
        m.put64(self.export.size());
        m.put16(self.flags());
        if !self.session.no_zeroes {
            m.extend_from_slice(&[0u8; 124]);
        }
        self.s.write_all(&m)?;
        Ok(self.finish(name))
    }

    fn list(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            return self.error(OPT_LIST, REP_ERR_INVALID, "option takes no data");
        }
        let mut m = Vec::new();
        let name = self.export.name().as_bytes();
        m.put32(u32::try_from(name.len()).unwrap_or(0));
        m.extend_from_slice(name);
        m.extend_from_slice(self.export.description().as_bytes());
        self.reply(OPT_LIST, REP_SERVER, &m)?;
        self.reply(OPT_LIST, REP_ACK, &[])
    }

    fn info(&mut self, opt: u32, data: &[u8]) -> io::Result<Option<Outcome>> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = usize::from(c.u16()?);
            let reqs: Option<Vec<u16>> = (0..n).map(|_| c.u16()).collect();
            (c.remaining() == 0).then_some((name, reqs?))
        })();
        let Some((name, reqs)) = parsed else {
            self.error(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO")?;
            return Ok(None);
        };
        if name != self.export.name().as_bytes() {
            self.error(opt, REP_ERR_UNKNOWN, "export not found")?;
            return Ok(None);
        }
        let mut m = Vec::new();
        m.put16(INFO_EXPORT);
        m.put64(self.export.size());
        m.put16(self.flags());
        self.reply(opt, REP_INFO, &m)?;
        if reqs.contains(&INFO_NAME) {
            let mut m = INFO_NAME.to_be_bytes().to_vec();
            m.extend_from_slice(self.export.name().as_bytes());
            self.reply(opt, REP_INFO, &m)?;
        }
        if reqs.contains(&INFO_DESCRIPTION) && !self.export.description().is_empty() {
            let mut m = INFO_DESCRIPTION.to_be_bytes().to_vec();
            m.extend_from_slice(self.export.description().as_bytes());
            self.reply(opt, REP_INFO, &m)?;
        }
        let mut m = Vec::new();
        m.put16(INFO_BLOCK_SIZE);
        m.put32(MIN_BLOCK);
        m.put32(PREFERRED_BLOCK);
        m.put32(MAX_PAYLOAD);
        self.reply(opt, REP_INFO, &m)?;
        self.reply(opt, REP_ACK, &[])?;
        Ok((opt == OPT_GO).then(|| self.finish(name)))
    }

    /// `LIST_META_CONTEXT` / `SET_META_CONTEXT`.
    fn meta(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // Replaced even when the option fails.
            self.session.contexts.clear();
            self.meta_export = None;
        }
        if !self.session.structured {
            return self.error(
                opt,
                REP_ERR_INVALID,
                "structured replies or extended headers not negotiated",
            );
        }
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u32()?;
            // Each query takes at least its 4-byte length: bound the count by the data.
            if usize::try_from(n).ok()? > c.remaining() / 4 {
                return None;
            }
            let qs: Option<Vec<&[u8]>> = (0..n).map(|_| c.string()).collect();
            (c.remaining() == 0).then_some((name, qs?))
        })();
        let Some((name, queries)) = parsed else {
            return self.error(opt, REP_ERR_INVALID, "malformed meta context option");
        };
        if queries.iter().any(|q| q.len() > MAX_STRING) || name.len() > MAX_STRING {
            return self.error(opt, REP_ERR_TOO_BIG, "query too long");
        }
        if name != self.export.name().as_bytes() {
            return self.error(opt, REP_ERR_UNKNOWN, "export not found");
        }
        let mut found: Vec<Context> = Vec::new();
        for ctx in Context::ALL {
            let matched = if set {
                queries.iter().any(|q| *q == ctx.name().as_bytes())
            } else {
                queries.is_empty() || queries.iter().any(|q| ctx.listed_by(q))
            };
            if matched {
                found.push(ctx);
            }
        }
        for ctx in &found {
            let id = if set { ctx.id() } else { 0 };
            let mut m = id.to_be_bytes().to_vec();
            m.extend_from_slice(ctx.name().as_bytes());
            self.reply(opt, REP_META_CONTEXT, &m)?;
        }
        if set {
            self.session.contexts = found;
            self.meta_export = Some(name.to_vec());
        }
        self.reply(opt, REP_ACK, &[])
    }
}
