//! qemu-img create's `Formatting '…', fmt=… size=… …` line, exactly as qemu prints it.
//!
//! qemu prints every create option of the format followed by those of the `file`
//! protocol, in the drivers' declaration order (not alphabetically), with the value given
//! or else the option's default (`cluster_size=65536 extended_l2=off …`); sizes and
//! numbers given by the user are printed parsed (`cluster_size=4k` → `4096`), strings with
//! commas doubled. Scripts and qemu's own test filters parse this line, so it matches
//! byte for byte.

use diskimg::OptionList;

/// How qemu prints a given value of an option.
#[derive(Clone, Copy)]
enum Kind {
    /// `QEMU_OPT_STRING`: commas doubled.
    Str,
    /// `QEMU_OPT_BOOL`: as written.
    Bool,
    /// `QEMU_OPT_SIZE` / `QEMU_OPT_NUMBER`: the parsed number.
    Num,
}

use Kind::{Bool, Num, Str};

/// One option: name, the default qemu prints when it is not given, and its kind.
type Opt = (&'static str, Option<&'static str>, Kind);

const QCOW2: &[Opt] = &[
    ("encryption", None, Bool),
    ("encrypt.format", None, Str),
    ("encrypt.key-secret", None, Str),
    ("encrypt.cipher-alg", None, Str),
    ("encrypt.cipher-mode", None, Str),
    ("encrypt.ivgen-alg", None, Str),
    ("encrypt.ivgen-hash-alg", None, Str),
    ("encrypt.hash-alg", None, Str),
    ("encrypt.iter-time", None, Num),
    ("cluster_size", Some("65536"), Num),
    ("extended_l2", Some("off"), Bool),
    ("preallocation", None, Str),
    ("compression_type", Some("zlib"), Str),
    ("size", None, Num),
    ("compat", None, Str),
    ("backing_file", None, Str),
    ("backing_fmt", None, Str),
    ("data_file", None, Str),
    ("data_file_raw", None, Bool),
    ("lazy_refcounts", Some("off"), Bool),
    ("refcount_bits", Some("16"), Num),
];

const VMDK: &[Opt] = &[
    ("size", None, Num),
    ("adapter_type", None, Str),
    ("backing_file", None, Str),
    ("backing_fmt", None, Str),
    ("compat6", Some("off"), Bool),
    ("hwversion", Some("undefined"), Str),
    ("toolsversion", None, Str),
    ("subformat", None, Str),
    ("zeroed_grain", None, Bool),
];

const VPC: &[Opt] = &[
    ("size", None, Num),
    ("subformat", None, Str),
    ("force_size", None, Bool),
];

const VDI: &[Opt] = &[("size", None, Num), ("static", Some("off"), Bool)];

const VHDX: &[Opt] = &[
    ("size", None, Num),
    ("log_size", Some("1048576"), Num),
    ("block_size", Some("0"), Num),
    ("subformat", None, Str),
    ("block_state_zero", None, Bool),
];

const LUKS: &[Opt] = &[
    ("size", None, Num),
    ("key-secret", None, Str),
    ("cipher-alg", None, Str),
    ("cipher-mode", None, Str),
    ("ivgen-alg", None, Str),
    ("ivgen-hash-alg", None, Str),
    ("hash-alg", None, Str),
    ("iter-time", None, Num),
    ("detached-header", None, Bool),
];

const RAW: &[Opt] = &[("size", None, Num)];

/// The `file` protocol's options, appended after the format's.
const FILE: &[Opt] = &[
    ("size", None, Num),
    ("nocow", None, Bool),
    ("preallocation", None, Str),
    ("extent_size_hint", None, Num),
];

fn options_of(format: &str) -> &'static [Opt] {
    match format {
        "qcow2" => QCOW2,
        "vmdk" => VMDK,
        "vpc" => VPC,
        "vdi" => VDI,
        "vhdx" => VHDX,
        "luks" => LUKS,
        _ => RAW,
    }
}

/// The line for creating `file` as `format` of `size` bytes with `options`.
pub(crate) fn line(file: &str, format: &str, options: &OptionList, size: u64) -> String {
    let mut s = format!("Formatting '{file}', fmt={format}");
    let mut seen: Vec<&str> = Vec::new();
    for &(name, default, kind) in options_of(format).iter().chain(FILE) {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let given = if name == "size" {
            Some(size.to_string())
        } else {
            options.get(name).map(str::to_string)
        };
        let text = match (given, kind) {
            (Some(v), Num) => diskimg::parse_size(&v).map_or(v, |n| n.to_string()),
            (Some(v), Str) => v.replace(',', ",,"),
            (Some(v), Bool) => v,
            (None, _) => match default {
                Some(d) => d.to_string(),
                None => continue,
            },
        };
        s.push_str(&format!(" {name}={text}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_as_qemu_prints_them() {
        // Lines printed by qemu-img 10.0.2 for the same options.
        let o = OptionList::new();
        assert_eq!(
            line("t.qcow2", "qcow2", &o, 1 << 20),
            "Formatting 't.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 lazy_refcounts=off refcount_bits=16"
        );
        assert_eq!(
            line("t.vmdk", "vmdk", &o, 1 << 20),
            "Formatting 't.vmdk', fmt=vmdk size=1048576 compat6=off hwversion=undefined"
        );
        assert_eq!(
            line("t.vhdx", "vhdx", &o, 1 << 20),
            "Formatting 't.vhdx', fmt=vhdx size=1048576 log_size=1048576 block_size=0"
        );
        let o = OptionList::parse(
            "cluster_size=4k,data_file=/tmp/x.data,preallocation=metadata,compat=0.10,backing_file=/tmp/b,backing_fmt=qcow2",
        )
        .unwrap();
        assert_eq!(
            line("t2.qcow2", "qcow2", &o, 1 << 20),
            "Formatting 't2.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=off preallocation=metadata compression_type=zlib size=1048576 compat=0.10 backing_file=/tmp/b backing_fmt=qcow2 data_file=/tmp/x.data lazy_refcounts=off refcount_bits=16"
        );
        let o = OptionList::parse(
            "nocow=on,extent_size_hint=1M,preallocation=full,subformat=twoGbMaxExtentFlat",
        )
        .unwrap();
        assert_eq!(
            line("t.vmdk", "vmdk", &o, 1 << 20),
            "Formatting 't.vmdk', fmt=vmdk size=1048576 compat6=off hwversion=undefined subformat=twoGbMaxExtentFlat nocow=on preallocation=full extent_size_hint=1048576"
        );
        let o = OptionList::parse("preallocation=falloc").unwrap();
        assert_eq!(
            line("t.raw", "raw", &o, 1 << 20),
            "Formatting 't.raw', fmt=raw size=1048576 preallocation=falloc"
        );
    }
}
