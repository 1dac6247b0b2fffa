//! HTTP(S) sources: [`HttpStorage`], a read-only [`Storage`] made of range requests
//! (like qemu's curl driver), and the fallback to one front-to-back pass when the
//! server ignores ranges.
//!
//! TLS is rustls (ring, webpki roots), never OpenSSL. Redirects are followed (up to
//! ten) and later requests go to the final URL. Reads are served in blocks of the
//! readahead size from a small cache, so a sequential reader makes one request per
//! block and parallel readers fetch different blocks at once. Requests that fail with
//! a 5xx status, a timeout or a broken connection are retried with exponential
//! backoff; other statuses fail at once, naming the URL.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diskimg_blockio::{Error, Result, Storage};
use ureq::ResponseExt;

use crate::recycle::{Recycled, Recycler};
use crate::transport;

/// How HTTP sources are fetched.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Extra request headers (`Authorization: Bearer …`), as (name, value).
    pub headers: Vec<(String, String)>,
    /// Retries of a failed request (5xx, timeouts, broken connections).
    pub retries: u32,
    /// First retry delay; doubled for each further retry.
    pub backoff: Duration,
    /// Time allowed to connect and to receive a response's headers.
    pub timeout: Duration,
    /// Bytes per range request (the readahead window), a power of two.
    pub block_size: u64,
    /// Blocks kept in the cache.
    pub cache_blocks: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            headers: Vec::new(),
            retries: 5,
            backoff: Duration::from_millis(200),
            timeout: Duration::from_secs(30),
            block_size: 4 << 20,
            cache_blocks: 8,
        }
    }
}

/// What opening a URL gave.
pub enum HttpSource {
    /// The server honours ranges: random access.
    Ranges(Box<HttpStorage>),
    /// The server ignores ranges: the body, front to back, and its length if sent.
    Stream(Box<dyn Read + Send>, Option<u64>),
}

/// A read-only storage over a URL whose server answers range requests.
pub struct HttpStorage {
    agent: ureq::Agent,
    url: String,
    len: u64,
    opts: HttpOptions,
    cache: Mutex<VecDeque<(u64, Arc<Recycled>)>>,
    /// Block buffers handed back once no reader holds them.
    spare: Recycler,
    /// Readers of the same block take the same stripe, so a block is fetched once even
    /// when several threads want it at the same time.
    stripes: Vec<Mutex<()>>,
}

/// Fetch stripes.
const STRIPES: usize = 64;

impl std::fmt::Debug for HttpStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStorage")
            .field("url", &self.url)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

fn agent(opts: &HttpOptions, body_timeout: bool) -> ureq::Agent {
    let mut cfg = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(10)
        .accept_encoding("identity")
        .timeout_connect(Some(opts.timeout))
        .timeout_recv_response(Some(opts.timeout));
    if body_timeout {
        cfg = cfg.timeout_recv_body(Some(opts.timeout.saturating_mul(4)));
    }
    cfg.build().into()
}

/// Whether an error is worth another try.
enum Failure {
    Retry(String),
    Fatal(String),
}

fn get(
    agent: &ureq::Agent,
    url: &str,
    opts: &HttpOptions,
    range: Option<(u64, u64)>,
) -> std::result::Result<ureq::http::Response<ureq::Body>, Failure> {
    let mut req = agent.get(url);
    for (k, v) in &opts.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if let Some((a, b)) = range {
        req = req.header("Range", format!("bytes={a}-{b}"));
    }
    match req.call() {
        Ok(r) if r.status().is_server_error() => {
            Err(Failure::Retry(format!("HTTP status {}", r.status())))
        }
        Ok(r) => Ok(r),
        Err(ureq::Error::Timeout(t)) => Err(Failure::Retry(format!("timeout ({t})"))),
        Err(ureq::Error::Io(e)) => Err(Failure::Retry(e.to_string())),
        Err(ureq::Error::ConnectionFailed) => Err(Failure::Retry("connection failed".into())),
        Err(e) => Err(Failure::Fatal(e.to_string())),
    }
}

/// Runs `f` up to `1 + retries` times while it asks for a retry.
fn with_retries<T>(
    url: &str,
    what: &str,
    opts: &HttpOptions,
    mut f: impl FnMut() -> std::result::Result<T, Failure>,
) -> Result<T> {
    let mut delay = opts.backoff;
    let mut attempt = 0;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(Failure::Fatal(m)) => return Err(transport(format!("'{url}': {what}"), m)),
            Err(Failure::Retry(m)) if attempt >= opts.retries => {
                return Err(transport(
                    format!("'{url}': {what}"),
                    format!("{m} (after {} attempts)", attempt + 1),
                ));
            }
            Err(Failure::Retry(_)) => {
                std::thread::sleep(delay);
                delay = delay.saturating_mul(2);
                attempt += 1;
            }
        }
    }
}

/// `Content-Range: bytes A-B/TOTAL` → (A, TOTAL).
fn content_range(r: &ureq::http::Response<ureq::Body>) -> Option<(u64, Option<u64>)> {
    let v = r.headers().get("content-range")?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, _) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, total.trim().parse().ok()))
}

/// Reads exactly `want` body bytes into one allocation of that size (no doubling growth:
/// parallel block fetches stay within their blocks' memory).
fn read_body(
    r: ureq::http::Response<ureq::Body>,
    want: usize,
    spare: &Recycler,
) -> std::result::Result<Vec<u8>, Failure> {
    let mut out = spare.take(want);
    let mut rd = r.into_body().into_with_config().limit(want as u64).reader();
    let mut n = 0;
    while n < want {
        match rd.read(out.get_mut(n..).unwrap_or_default()) {
            Ok(0) => return Err(Failure::Retry(format!("short body: {n} of {want} bytes"))),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::Retry(e.to_string())),
        }
    }
    Ok(out)
}

impl HttpSource {
    /// Opens `url`: one ranged GET of the first block tells whether the server honours
    /// ranges and the length; a `200` answer becomes the front-to-back stream.
    pub fn open(url: &str, opts: &HttpOptions) -> Result<HttpSource> {
        let ranged = agent(opts, true);
        let first = opts.block_size.max(4096);
        let resp = with_retries(url, "could not open", opts, || {
            get(&ranged, url, opts, Some((0, first - 1)))
        })?;
        let status = resp.status().as_u16();
        let final_url = resp.get_uri().to_string();
        match status {
            206 => {
                let (start, total) = content_range(&resp).ok_or_else(|| {
                    transport(format!("'{url}'"), "206 without a valid Content-Range")
                })?;
                let total = total.ok_or_else(|| {
                    transport(
                        format!("'{url}'"),
                        "the server does not say the length (Content-Range */*)",
                    )
                })?;
                if start != 0 {
                    return Err(transport(
                        format!("'{url}'"),
                        "the server answered another range",
                    ));
                }
                let want = usize::try_from(first.min(total)).unwrap_or(0);
                let spare = Recycler::new(opts.cache_blocks.max(1));
                let body = with_retries(url, "read failed at offset 0", opts, {
                    let mut resp = Some(resp);
                    let spare = &spare;
                    move || match resp.take() {
                        Some(r) => read_body(r, want, spare),
                        None => Err(Failure::Fatal("body already consumed".into())),
                    }
                })?;
                let s = HttpStorage {
                    agent: ranged,
                    url: final_url,
                    len: total,
                    opts: opts.clone(),
                    cache: Mutex::new(VecDeque::new()),
                    spare: spare.clone(),
                    stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                };
                s.cache_put(0, Arc::new(Recycled::new(body, &spare)));
                Ok(HttpSource::Ranges(Box::new(s)))
            }
            416 => Ok(HttpSource::Stream(Box::new(std::io::empty()), Some(0))),
            200 => {
                // The server ignored the range: read the whole body front to back, on
                // an agent without a body timeout (a large image takes long).
                drop(resp);
                let plain = agent(opts, false);
                let resp =
                    with_retries(url, "could not open", opts, || get(&plain, url, opts, None))?;
                if resp.status().as_u16() != 200 {
                    return Err(transport(
                        format!("'{url}'"),
                        format!("HTTP status {}", resp.status()),
                    ));
                }
                let len = resp.body().content_length();
                let reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
                Ok(HttpSource::Stream(Box::new(reader), len))
            }
            s => Err(transport(format!("'{url}'"), format!("HTTP status {s}"))),
        }
    }
}

impl HttpStorage {
    /// The URL requests go to (after redirects).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn cache_get(&self, idx: u64) -> Option<Arc<Recycled>> {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let pos = c.iter().position(|(i, _)| *i == idx)?;
        let e = c.remove(pos)?;
        let data = e.1.clone();
        c.push_back(e);
        Some(data)
    }

    fn cache_put(&self, idx: u64, data: Arc<Recycled>) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|(i, _)| *i != idx);
        c.push_back((idx, data));
        while c.len() > self.opts.cache_blocks.max(1) {
            c.pop_front();
        }
    }

    /// Block `idx` (from the cache or one range request).
    fn block(&self, idx: u64) -> Result<Arc<Recycled>> {
        let stripe = self
            .stripes
            .get(usize::try_from(idx % STRIPES as u64).unwrap_or(0))
            .ok_or(Error::internal("no fetch stripe"))?;
        let _fetching = stripe.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = self.cache_get(idx) {
            return Ok(b);
        }
        let bs = self.opts.block_size;
        let start = idx * bs;
        let end = (start + bs).min(self.len);
        let want = usize::try_from(end - start).map_err(|_| Error::internal("block too large"))?;
        let what = format!("read failed at offset {start}");
        let data = with_retries(&self.url, &what, &self.opts, || {
            let r = get(&self.agent, &self.url, &self.opts, Some((start, end - 1)))?;
            match (r.status().as_u16(), content_range(&r)) {
                (206, Some((a, _))) if a == start => read_body(r, want, &self.spare),
                (s, _) => Err(Failure::Fatal(format!(
                    "unexpected answer to a range request (HTTP status {s})"
                ))),
            }
        })?;
        let data = Arc::new(Recycled::new(data, &self.spare));
        self.cache_put(idx, data.clone());
        Ok(data)
    }
}

impl Storage for HttpStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "'{}': read of {} bytes at offset {offset} past the end ({} bytes)",
                    self.url,
                    buf.len(),
                    self.len
                ))
            })?;
        let bs = self.opts.block_size;
        let mut pos = offset;
        while pos < end {
            let idx = pos / bs;
            let block = self.block(idx)?;
            let in_block = usize::try_from(pos - idx * bs).unwrap_or(usize::MAX);
            let n = usize::try_from((end - pos).min(bs - (pos - idx * bs))).unwrap_or(0);
            let src = block
                .get(in_block..in_block + n)
                .ok_or(Error::internal("short block"))?;
            let at = usize::try_from(pos - offset).unwrap_or(usize::MAX);
            buf.get_mut(at..at + n)
                .ok_or(Error::internal("short buffer"))?
                .copy_from_slice(src);
            pos += n as u64;
        }
        Ok(())
    }

    diskimg_blockio::read_only_storage!();

    fn len(&self) -> Result<u64> {
        Ok(self.len)
    }
}

/// Parses a `--header` value `Name: value`.
pub fn parse_header(s: &str) -> Option<(String, String)> {
    let (k, v) = s.split_once(':')?;
    let k = k.trim();
    (!k.is_empty() && !k.contains(char::is_whitespace))
        .then(|| (k.to_string(), v.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;

    /// A server on 127.0.0.1 answering `n` requests with `status` and no body.
    fn answering(status: &'static str, n: usize) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/img", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for s in l.incoming().take(n) {
                let Ok(mut s) = s else { break };
                let mut req = [0u8; 4096];
                let _ = s.read(&mut req);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        url
    }

    #[test]
    fn server_refusals_and_failures_are_io_errors() {
        let opts = HttpOptions {
            retries: 1,
            backoff: Duration::from_millis(1),
            timeout: Duration::from_secs(10),
            ..HttpOptions::default()
        };
        let e = HttpSource::open(&answering("404 Not Found", 1), &opts).err();
        let e = e.expect("a 404 must fail");
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(e.to_string().ends_with("': HTTP status 404"), "{e}");
        let e = HttpSource::open(&answering("503 Service Unavailable", 2), &opts).err();
        let e = e.expect("a 503 must fail");
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("(after 2 attempts)"), "{e}");
    }
}
