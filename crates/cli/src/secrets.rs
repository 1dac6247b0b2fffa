//! qemu's secret objects and `--image-opts`: `--object secret,id=ID,data=…|file=…`
//! (global, any verb) and `--image-opts` (image arguments are `driver=qcow2,
//! file.filename=F,encrypt.key-secret=ID` option strings instead of file names).
//!
//! The secret bytes live only in a [`Secrets`] set (zeroized on drop); no message here
//! ever contains them.

use std::sync::{Mutex, OnceLock};

use anyhow::{Result, anyhow, bail};
use diskimg::blockio::Secrets;
use diskimg::{Format, ImageOptions, OptionList};

/// The global options every verb accepts.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct GlobalArgs {
    /// A qemu object; only `secret,id=ID,data=STRING|file=PATH[,format=raw|base64]`.
    #[arg(long = "object", global = true)]
    pub(crate) objects: Vec<String>,
    /// Image arguments are option strings (`driver=qcow2,file.filename=F,encrypt.key-secret=ID`).
    #[arg(long = "image-opts", global = true)]
    pub(crate) image_opts: bool,
}

struct State {
    secrets: Secrets,
    image_opts: bool,
    /// Open encrypted images without a key (metadata only), as `qemu-img info`.
    no_io: bool,
}

/// The qcow2 driver option for a metadata-only open of an encrypted image.
const NO_IO: &str = "encrypt.no-io";

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE
        .get_or_init(|| {
            Mutex::new(State {
                secrets: Secrets::new(),
                image_opts: false,
                no_io: false,
            })
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn base64(s: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => bail!("Unable to decode base64 data"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap_or(0));
        }
    }
    Ok(out)
}

/// Parses one `--object` value into `secrets` (errors never quote the data).
fn add_object(secrets: &mut Secrets, spec: &str) -> Result<()> {
    let mut o = OptionList::parse(spec).map_err(|_| anyhow!("Invalid --object option"))?;
    let ty = o.entries().first().map(|(k, v)| (k.clone(), v.clone()));
    match ty {
        Some((k, v)) if v == "on" && k == "secret" => {
            o.take("secret");
        }
        Some((k, _)) if k == "qom-type" => {
            if o.take("qom-type").as_deref() != Some("secret") {
                bail!("Object type not supported by diskimg (only 'secret')");
            }
        }
        _ => bail!("Object type not supported by diskimg (only 'secret')"),
    }
    let id = o
        .take("id")
        .ok_or_else(|| anyhow!("Parameter 'id' is missing"))?;
    let data = o.take("data");
    let file = o.take("file");
    let format = o.take("format");
    if o.take("keyid").is_some() || o.take("iv").is_some() {
        bail!("secret '{id}': encrypted secrets (keyid/iv) are not supported by diskimg");
    }
    if let Some((k, _)) = o.entries().first() {
        bail!("Invalid parameter '{k}'");
    }
    let raw: Vec<u8> = match (data, file) {
        (Some(_), Some(_)) => bail!("'data' and 'file' are mutually exclusive"),
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => std::fs::read(&f)
            .map_err(|e| anyhow!("Unable to read {f}: {}", crate::message(&e.into())))?,
        (None, None) => bail!("Either 'data' or 'file' must be provided"),
    };
    let bytes = match format.as_deref() {
        None | Some("raw") => raw,
        Some("base64") => {
            let text = String::from_utf8_lossy(&raw).into_owned();
            base64(&text)?
        }
        Some(f) => bail!("Invalid parameter 'format' value '{f}'"),
    };
    secrets.insert(id, bytes);
    Ok(())
}

/// Records the global options (call once, before any verb runs).
pub(crate) fn init(a: &GlobalArgs) -> Result<()> {
    let mut secrets = Secrets::new();
    for o in &a.objects {
        add_object(&mut secrets, o)?;
    }
    let mut s = state();
    s.secrets = secrets;
    s.image_opts = a.image_opts;
    Ok(())
}

/// The secrets given with `--object`.
pub(crate) fn secrets() -> Secrets {
    state().secrets.clone()
}

/// True with `--image-opts`: image arguments are option strings.
pub(crate) fn image_opts() -> bool {
    state().image_opts
}

/// Makes following opens of encrypted images without a key succeed for metadata only
/// (`info`, as qemu's `BDRV_O_NO_IO`); external data files are not opened.
pub(crate) fn set_metadata_only() {
    state().no_io = true;
}

/// Resolves an image argument: with `--image-opts` an option string giving the driver,
/// the file name and driver options; else a plain file name. Returns the path, the
/// format and the image options carrying secrets and driver options.
pub(crate) fn resolve(
    arg: &str,
    format: Option<Format>,
) -> Result<(String, Option<Format>, ImageOptions)> {
    let s = state();
    let mut opts = ImageOptions::default().with_secrets(s.secrets.clone());
    opts.node_drivers = crate::io::blkdebug::node_drivers();
    if s.no_io {
        // As qemu-img info: external data files are not opened either.
        opts.metadata_only = true;
        // For the whole chain (the facade hands `backing.`-prefixed options down).
        let mut prefix = String::new();
        for _ in 0..=16 {
            opts.driver_options.set(&format!("{prefix}{NO_IO}"), "on");
            prefix.push_str("backing.");
        }
    }
    if !s.image_opts || !arg.contains('=') {
        return Ok((crate::names::host_path(arg), format, opts));
    }
    drop(s);
    let mut o = OptionList::parse(arg).map_err(|e| anyhow!("{e}"))?;
    let format = match o.take("driver") {
        Some(d) => Some(Format::from_name(&d).map_err(|_| anyhow!("Unknown driver '{d}'"))?),
        None => format,
    };
    let file = o
        .take("file.filename")
        .or_else(|| o.take("file"))
        .ok_or_else(|| anyhow!("A block device must be specified for \"file\""))?;
    if let Some(d) = o.take("file.driver")
        && d != "file"
    {
        bail!("file.driver '{d}' is not supported by diskimg (only 'file')");
    }
    if let Some(v) = o.take("file.locking") {
        opts.locking = match v.as_str() {
            "on" | "auto" => true,
            "off" => false,
            _ => bail!("invalid parameter value: {v}"),
        };
    }
    if let Some(v) = o.take("force-share") {
        opts.force_share = crate::imgspec::parse_bool("force-share", &v)?;
    }
    for k in [
        "file.aio",
        "cache.direct",
        "cache.no-flush",
        "discard",
        "detect-zeroes",
    ] {
        o.take(k);
    }
    for (k, v) in o.entries() {
        opts.driver_options.set(k, v);
    }
    Ok((file, format, opts))
}

/// Warns (stderr) when `img` uses legacy qcow2 AES encryption, which is insecure.
pub(crate) fn warn_legacy_aes(arg: &str, img: &diskimg::Image) {
    use diskimg::blockio::InfoValue;
    let info = img.device.info();
    let legacy = info.format_specific.as_ref().is_some_and(|(_, d)| {
        d.iter().any(|(k, v)| {
            k == "encrypt"
                && matches!(v, InfoValue::Map(m)
                    if m.iter().any(|(k, v)| k == "format" && *v == InfoValue::Str("aes".into())))
        })
    });
    // qemu's tools say nothing; as diskimg we warn (docs/cli.md).
    if legacy && !state().no_io && !crate::common::as_qemu() {
        eprintln!(
            "diskimg: warning: '{arg}' uses legacy qcow2 AES encryption, which is insecure; \
             convert it to encrypt.format=luks"
        );
    }
}

/// Image options for opening `file` (a plain name) with the given qcow2 key secret id.
pub(crate) fn with_key(key_secret: Option<&str>) -> ImageOptions {
    let mut opts = ImageOptions::default().with_secrets(secrets());
    if let Some(id) = key_secret {
        // qcow2 names it `encrypt.key-secret`, the luks format `key-secret`.
        opts.driver_options.set("encrypt.key-secret", id);
        opts.driver_options.set("key-secret", id);
    }
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_parse_and_errors_hide_data() {
        let mut s = Secrets::new();
        add_object(&mut s, "secret,id=a,data=p4ss").unwrap();
        add_object(&mut s, "secret,id=b,data=aGVsbG8=,format=base64").unwrap();
        assert_eq!(s.get("a"), Some(&b"p4ss"[..]));
        assert_eq!(s.get("b"), Some(&b"hello"[..]));
        for bad in [
            "secret,data=topsecret",
            "iothread,id=x",
            "secret,id=c,data=topsecret,bogus=1",
            "secret,id=c,data=topsecret,file=/x",
        ] {
            let e = add_object(&mut s, bad).unwrap_err().to_string();
            assert!(!e.contains("topsecret"), "{e}");
        }
    }
}
