//! `info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE`.

use anyhow::Result;
use diskimg::Image;
use diskimg::blockio::InfoValue;
use serde_json::{Map, Value, json};

use crate::args::{FormatArg, OutputArg, ReadOnlyShareArg};
use crate::common::{full_backing_name, human_size, open_image, out};
use crate::json::{info_map, pretty};

/// Arguments of `info`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    format: FormatArg,
    #[command(flatten)]
    output: OutputArg,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    #[command(flatten)]
    force_share: ReadOnlyShareArg,
    /// The image.
    file: String,
}

struct Entry<'a> {
    img: &'a Image,
    /// The name shown as "image:"/"filename".
    name: String,
    /// The name its backing file name is relative to.
    base: String,
}

pub(crate) fn run(a: Args) -> Result<i32> {
    a.force_share.apply();
    let json = a.output.json()?;
    let format = a.format.of(&a.file)?;
    // As qemu-img info: encrypted images open without their key (metadata only).
    crate::secrets::set_metadata_only();
    let img = match open_image(&a.file, format, true, a.backing_chain) {
        Ok(img) => img,
        Err(e) if a.backing_chain && !crate::imgspec::is_spec_or_opts(&a.file) => {
            return Err(crate::layers::chain_failure(&a.file, format, e));
        }
        Err(e) => return Err(e),
    };
    let name = crate::names::shown(&a.file, crate::secrets::image_opts());
    // A name qemu cannot reconstruct (`json:{…}`) still has the file's directory.
    let base = if name.starts_with("json:") {
        img.path.to_string_lossy().into_owned()
    } else {
        name.clone()
    };
    let mut entries = vec![Entry {
        img: &img,
        name,
        base,
    }];
    if a.backing_chain {
        let mut cur = &img;
        let mut name = entries.first().map(|e| e.base.clone()).unwrap_or_default();
        while let Some(b) = cur.backing.as_deref() {
            name = full_backing_name(&name, &b.filename);
            entries.push(Entry {
                img: b,
                name: name.clone(),
                base: name.clone(),
            });
            cur = b;
        }
    }
    if json {
        let list: Vec<Value> = entries.iter().map(to_json).collect();
        let v = if a.backing_chain {
            Value::Array(list)
        } else {
            list.into_iter().next().unwrap_or(Value::Null)
        };
        out(&format!("{}\n", pretty(&v)))?;
    } else {
        let texts: Vec<String> = entries.iter().map(human).collect();
        out(&texts.join("\n"))?;
    }
    Ok(0)
}

/// The protocol layer's length: qemu's file driver counts whole 512-byte sectors.
fn file_len(img: &Image) -> u64 {
    std::fs::metadata(&img.path).map_or(0, |m| m.len().div_ceil(512) * 512)
}

/// `ImageInfo` in qemu's key order.
fn to_json(e: &Entry<'_>) -> Value {
    let info = e.img.device.info();
    let actual = e.img.actual_size();
    let mut child = Map::new();
    child.insert("children".into(), json!([]));
    child.insert("virtual-size".into(), json!(file_len(e.img)));
    child.insert("filename".into(), json!(e.base));
    child.insert("format".into(), json!("file"));
    if let Some(a) = actual {
        child.insert("actual-size".into(), json!(a));
    }
    child.insert(
        "format-specific".into(),
        json!({"type": "file", "data": {}}),
    );
    child.insert("dirty-flag".into(), json!(false));

    let mut m = Map::new();
    m.insert(
        "children".into(),
        json!([{"name": "file", "info": Value::Object(child)}]),
    );
    if !info.snapshots.is_empty() {
        let snaps: Vec<Value> = info
            .snapshots
            .iter()
            .map(|s| {
                let mut o = Map::new();
                if let Some(i) = s.icount {
                    o.insert("icount".into(), json!(i));
                }
                o.insert(
                    "vm-clock-nsec".into(),
                    json!(s.vm_clock_nsec % 1_000_000_000),
                );
                o.insert("name".into(), json!(s.name));
                o.insert("date-sec".into(), json!(s.date_sec));
                o.insert("date-nsec".into(), json!(s.date_nsec));
                o.insert(
                    "vm-clock-sec".into(),
                    json!(s.vm_clock_nsec / 1_000_000_000),
                );
                o.insert("id".into(), json!(s.id));
                o.insert("vm-state-size".into(), json!(s.vm_state_size));
                Value::Object(o)
            })
            .collect();
        m.insert("snapshots".into(), Value::Array(snaps));
    }
    let backing = info.backing.as_ref().filter(|b| !b.filename.is_empty());
    if let Some(f) = backing.and_then(|b| b.format.as_ref()) {
        m.insert("backing-filename-format".into(), json!(f));
    }
    m.insert("virtual-size".into(), json!(info.virtual_size));
    m.insert("filename".into(), json!(e.name));
    if let Some(c) = info.cluster_size {
        m.insert("cluster-size".into(), json!(c));
    }
    m.insert("format".into(), json!(info.format));
    if let Some(a) = actual {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some((ty, data)) = &info.format_specific {
        let data = extent_paths(data, &e.base);
        m.insert(
            "format-specific".into(),
            json!({"type": ty, "data": Value::Object(info_map(&data))}),
        );
    }
    if info.encrypted {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(b) = backing {
        let unresolvable = e.base.is_empty() && !b.filename.starts_with('/');
        if !unresolvable {
            m.insert(
                "full-backing-filename".into(),
                json!(full_backing_name(&e.base, &b.filename)),
            );
        }
        m.insert("backing-filename".into(), json!(b.filename));
    }
    m.insert("dirty-flag".into(), json!(info.dirty));
    Value::Object(m)
}

/// qemu's human `info` text for one image.
fn human(e: &Entry<'_>) -> String {
    let info = e.img.device.info();
    let actual = e.img.actual_size();
    let disk = actual.map_or_else(|| "unavailable".to_string(), human_size);
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {disk}\n",
        e.name,
        info.format,
        human_size(info.virtual_size),
        info.virtual_size
    );
    if info.encrypted {
        s.push_str("encrypted: yes\n");
    }
    if let Some(c) = info.cluster_size {
        s.push_str(&format!("cluster_size: {c}\n"));
    }
    if info.dirty {
        s.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = info.backing.as_ref().filter(|b| !b.filename.is_empty()) {
        let full = full_backing_name(&e.base, &b.filename);
        s.push_str(&format!("backing file: {}", b.filename));
        if e.base.is_empty() && full == b.filename && !full.starts_with('/') {
            // A node without a directory (quorum): qemu cannot resolve the name.
            s.push_str(" (cannot determine actual path)");
        } else if full != b.filename {
            s.push_str(&format!(" (actual path: {full})"));
        }
        s.push('\n');
        if let Some(f) = &b.format {
            s.push_str(&format!("backing file format: {f}\n"));
        }
    }
    if !info.snapshots.is_empty() {
        s.push_str("Snapshot list:\n");
        s.push_str(&crate::snapshot::table(&info.snapshots));
    }
    if let Some((_, data)) = &info.format_specific {
        s.push_str("Format specific information:\n");
        dump_map(&extent_paths(data, &e.base), 1, &mut s);
    }
    s.push_str(&format!(
        "Child node '/file':\n    filename: {}\n    protocol type: file\n    file length: {} ({} bytes)\n    disk size: {disk}\n",
        e.base,
        human_size(file_len(e.img)),
        file_len(e.img)
    ));
    s
}

/// The `filename`s of a vmdk's `extents` as qemu shows them: relative names joined to
/// the directory of the descriptor (`base`), as they are opened.
fn extent_paths(data: &[(String, InfoValue)], base: &str) -> Vec<(String, InfoValue)> {
    let join = |m: &[(String, InfoValue)]| -> Vec<(String, InfoValue)> {
        m.iter()
            .map(|(k, v)| match v {
                InfoValue::Str(f) if k == "filename" && !f.is_empty() => {
                    (k.clone(), InfoValue::Str(full_backing_name(base, f)))
                }
                _ => (k.clone(), v.clone()),
            })
            .collect()
    };
    data.iter()
        .map(|(k, v)| match v {
            InfoValue::List(items) if k == "extents" => {
                let items = items
                    .iter()
                    .map(|x| match x {
                        InfoValue::Map(m) => InfoValue::Map(join(m)),
                        other => other.clone(),
                    })
                    .collect();
                (k.clone(), InfoValue::List(items))
            }
            _ => (k.clone(), v.clone()),
        })
        .collect()
}

fn pad(level: usize) -> String {
    "    ".repeat(level)
}

/// qemu's `dump_qdict`: `key: value`, dashes in keys shown as spaces, nested
/// containers on their own lines.
pub(crate) fn dump_map(m: &[(String, InfoValue)], level: usize, s: &mut String) {
    for (k, v) in m {
        let key = k.replace('-', " ");
        match v {
            InfoValue::Map(inner) => {
                s.push_str(&format!("{}{key}:\n", pad(level)));
                dump_map(inner, level + 1, s);
            }
            InfoValue::List(items) => {
                s.push_str(&format!("{}{key}:\n", pad(level)));
                dump_list(items, level + 1, s);
            }
            other => s.push_str(&format!("{}{key}: {}\n", pad(level), scalar(other))),
        }
    }
}

fn dump_list(items: &[InfoValue], level: usize, s: &mut String) {
    for (i, v) in items.iter().enumerate() {
        match v {
            InfoValue::Map(inner) => {
                s.push_str(&format!("{}[{i}]:\n", pad(level)));
                dump_map(inner, level + 1, s);
            }
            InfoValue::List(l) => {
                s.push_str(&format!("{}[{i}]:\n", pad(level)));
                dump_list(l, level + 1, s);
            }
            other => s.push_str(&format!("{}[{i}]: {}\n", pad(level), scalar(other))),
        }
    }
}

fn scalar(v: &InfoValue) -> String {
    match v {
        InfoValue::Bool(b) => b.to_string(),
        InfoValue::Int(i) => i.to_string(),
        InfoValue::Str(s) => s.clone(),
        InfoValue::List(_) | InfoValue::Map(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_specific_dump_like_qemu() {
        // qemu-img info of a qcow2 (qemu-img-surface.md §3.1, human form).
        let data = vec![
            ("compat".to_string(), InfoValue::Str("1.1".into())),
            (
                "compression-type".to_string(),
                InfoValue::Str("zlib".into()),
            ),
            ("lazy-refcounts".to_string(), InfoValue::Bool(false)),
            ("refcount-bits".to_string(), InfoValue::Int(16)),
            ("corrupt".to_string(), InfoValue::Bool(false)),
            ("extended-l2".to_string(), InfoValue::Bool(false)),
        ];
        let mut s = String::new();
        dump_map(&data, 1, &mut s);
        assert_eq!(
            s,
            "    compat: 1.1\n    compression type: zlib\n    lazy refcounts: false\n    refcount bits: 16\n    corrupt: false\n    extended l2: false\n"
        );
    }
}
