//! `create`: every qemu-img create option for qcow2, validated with qemu's messages.

use std::sync::Arc;

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{
    BlockDevice, CreateOptionSpec, CreateRequest, Error, FilePurpose, OpenOptions, Preallocation,
    Result, Storage,
};

use crate::device::Qcow2Device;
use crate::ext::Extensions;
use crate::header::{
    AUTOCLEAR_DATA_RAW, COMPAT_LAZY, Header, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2, V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::refcount::set_entry;

/// The options `qemu-img create -f qcow2 -o help` lists.
pub(crate) static CREATE_OPTIONS: &[CreateOptionSpec] = &[
    CreateOptionSpec {
        name: "backing_file",
        kind: "<str>",
        help: "File name of a base image",
    },
    CreateOptionSpec {
        name: "backing_fmt",
        kind: "<str>",
        help: "Image format of the base image",
    },
    CreateOptionSpec {
        name: "cluster_size",
        kind: "<size>",
        help: "qcow2 cluster size",
    },
    CreateOptionSpec {
        name: "compat",
        kind: "<str>",
        help: "Compatibility level (v2 [0.10] or v3 [1.1])",
    },
    CreateOptionSpec {
        name: "compression_type",
        kind: "<str>",
        help: "Compression method used for image cluster compression",
    },
    CreateOptionSpec {
        name: "data_file",
        kind: "<str>",
        help: "File name of an external data file",
    },
    CreateOptionSpec {
        name: "data_file_raw",
        kind: "<bool (on/off)>",
        help: "The external data file must stay valid as a raw image",
    },
    CreateOptionSpec {
        name: "encrypt.cipher-alg",
        kind: "<str>",
        help: "Name of encryption cipher algorithm",
    },
    CreateOptionSpec {
        name: "encrypt.cipher-mode",
        kind: "<str>",
        help: "Name of encryption cipher mode",
    },
    CreateOptionSpec {
        name: "encrypt.format",
        kind: "<str>",
        help: "Encrypt the image, format choices: 'aes', 'luks'",
    },
    CreateOptionSpec {
        name: "encrypt.hash-alg",
        kind: "<str>",
        help: "Name of encryption hash algorithm",
    },
    CreateOptionSpec {
        name: "encrypt.iter-time",
        kind: "<num>",
        help: "Time to spend in PBKDF in milliseconds",
    },
    CreateOptionSpec {
        name: "encrypt.ivgen-alg",
        kind: "<str>",
        help: "Name of IV generator algorithm",
    },
    CreateOptionSpec {
        name: "encrypt.ivgen-hash-alg",
        kind: "<str>",
        help: "Name of IV generator hash algorithm",
    },
    CreateOptionSpec {
        name: "encrypt.key-secret",
        kind: "<str>",
        help: "ID of secret providing qcow AES key or LUKS passphrase",
    },
    CreateOptionSpec {
        name: "encryption",
        kind: "<bool (on/off)>",
        help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    },
    CreateOptionSpec {
        name: "extended_l2",
        kind: "<bool (on/off)>",
        help: "Extended L2 tables",
    },
    CreateOptionSpec {
        name: "lazy_refcounts",
        kind: "<bool (on/off)>",
        help: "Postpone refcount updates",
    },
    CreateOptionSpec {
        name: "preallocation",
        kind: "<str>",
        help: "Preallocation mode (allowed values: off, metadata, falloc, full)",
    },
    CreateOptionSpec {
        name: "refcount_bits",
        kind: "<num>",
        help: "Width of a reference count entry in bits",
    },
    CreateOptionSpec {
        name: "size",
        kind: "<size>",
        help: "Virtual disk size",
    },
];

fn bad_value(param: &str, v: &str) -> Error {
    Error::invalid(format!("Parameter '{param}' does not accept value '{v}'"))
}

const NEEDS_V3: &str = "compatibility level 1.1 and above (use version=v3 or greater)";

/// Creates an empty qcow2 image on `storage`.
pub(crate) fn create(storage: Arc<dyn Storage>, req: &mut CreateRequest) -> Result<()> {
    let o = &mut req.options;
    o.take("size");
    let version = match o.take("compat").as_deref() {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(v) => return Err(bad_value("version", v)),
    };
    let cluster_size = o.take_size("cluster_size")?.unwrap_or(65536);
    // qemu's number options take negative values modulo 2^64: a bad width, not a
    // parse error.
    let refcount_bits = match o.take("refcount_bits") {
        None => 16,
        Some(v) if v.trim_start().starts_with('-') && v.trim().parse::<i64>().is_ok() => 0,
        Some(v) => v.trim().parse::<u64>().map_err(|_| {
            Error::invalid(format!(
                "Parameter 'refcount_bits' expects a number, got '{v}'"
            ))
        })?,
    };
    let lazy = o.take_bool("lazy_refcounts")?.unwrap_or(false);
    let extl2 = o.take_bool("extended_l2")?.unwrap_or(false);
    let zstd = match o.take("compression_type").as_deref() {
        None | Some("zlib") => false,
        Some("zstd") => true,
        Some(v) => return Err(bad_value("compression-type", v)),
    };
    let prealloc = match o.take("preallocation") {
        None => Preallocation::Off,
        Some(v) => Preallocation::parse(&v).map_err(|_| bad_value("preallocation", &v))?,
    };
    let backing = o.take("backing_file");
    let backing_fmt = o.take("backing_fmt");
    let data_file = o.take("data_file");
    let data_raw = o.take_bool("data_file_raw")?.unwrap_or(false);
    let encryption = crate::encrypt_create::take_options(o, &req.secrets)?;
    if !req.size.is_multiple_of(512) {
        return Err(Error::invalid("Image size must be a multiple of 512 bytes"));
    }
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(Error::invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(Error::invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version == 2 {
        if refcount_bits != 16 {
            return Err(Error::invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or \
                 above (use version=v3 or greater)",
            ));
        }
        if lazy {
            return Err(Error::invalid(format!(
                "Lazy refcounts only supported with {NEEDS_V3}"
            )));
        }
        if extl2 {
            return Err(Error::invalid(format!(
                "Extended L2 entries are only supported with {NEEDS_V3}"
            )));
        }
        if zstd {
            return Err(Error::invalid(format!(
                "Non-zlib compression type is only supported with {NEEDS_V3}"
            )));
        }
        if data_file.is_some() {
            return Err(Error::invalid(format!(
                "External data files are only supported with {NEEDS_V3}"
            )));
        }
    }
    if extl2 && cluster_size < 16384 {
        return Err(Error::invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    if data_raw && data_file.is_none() {
        return Err(Error::invalid("data-file-raw requires data-file"));
    }
    if data_raw && backing.is_some() {
        return Err(Error::invalid(
            "Backing file and data-file-raw cannot be used at the same time",
        ));
    }
    if backing.is_some() && prealloc != Preallocation::Off && !extl2 {
        return Err(Error::invalid(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    if backing_fmt.is_some() && backing.is_none() {
        return Err(Error::invalid(
            "Backing format cannot be used without backing file",
        ));
    }
    // qemu's size check at create: the L1 table must fit its 32 MiB limit.
    let l2e = if extl2 { 16 } else { 8 };
    let l2_tables = req.size.div_ceil(cluster_size).div_ceil(cluster_size / l2e);
    if l2_tables.saturating_mul(8) > crate::header::MAX_L1_BYTES {
        return Err(Error::invalid(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ));
    }

    let cluster_bits = cluster_size.trailing_zeros();
    let mut h = Header {
        version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cluster_size,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: refcount_bits.trailing_zeros(),
        header_length: if version == 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        },
        compression_type: u8::from(zstd),
        backing_file: backing.clone(),
        ext: Extensions {
            backing_format: backing.as_ref().and(backing_fmt.clone()),
            data_file: data_file.clone(),
            features: if version == 3 {
                Extensions::qemu_feature_table_for(cluster_size)
            } else {
                Vec::new()
            },
            ..Extensions::default()
        },
    };
    if zstd {
        h.incompatible |= INCOMPAT_COMPRESSION;
    }
    if extl2 {
        h.incompatible |= INCOMPAT_EXTL2;
    }
    if data_file.is_some() {
        h.incompatible |= INCOMPAT_DATA_FILE;
    }
    if lazy {
        h.compatible |= COMPAT_LAZY;
    }
    if data_raw {
        h.autoclear |= AUTOCLEAR_DATA_RAW;
    }
    if let Some(e) = &encryption {
        e.prepare(&mut h, prealloc)?;
    }
    let usz = |v: u64| usize::try_from(v).map_err(|_| Error::invalid("size"));
    let mut cluster0 = vec![0u8; usz(cluster_size)?];
    let ext = h.ext.serialise(version);
    let ext_end = u64::from(h.header_length) + ext.len() as u64;
    if let Some(b) = &backing {
        if b.len() > 1023 || ext_end + b.len() as u64 > cluster_size {
            return Err(Error::invalid("Backing file name too long"));
        }
        h.backing_file_offset = ext_end;
        h.backing_file_size = u32::try_from(b.len()).unwrap_or(0);
        cluster0.put(usz(ext_end)?, b.as_bytes());
    } else if ext_end > cluster_size {
        return Err(Error::invalid(
            "qcow2 header extensions do not fit in one cluster",
        ));
    }
    h.write_fixed(&mut cluster0);
    cluster0.put(usz(u64::from(h.header_length))?, &ext);

    let mut reftable = vec![0u8; usz(cluster_size)?];
    reftable.put_be_u64(0, 2 * cluster_size);
    let mut refblock = vec![0u8; usz(cluster_size)?];
    for c in 0..3 {
        set_entry(&mut refblock, c, h.refcount_order, 1);
    }
    storage.set_len(0)?;
    storage.write_all_at(&cluster0, 0)?;
    storage.write_all_at(&reftable, cluster_size)?;
    storage.write_all_at(&refblock, 2 * cluster_size)?;
    storage.flush()?;

    if let Some(name) = &data_file {
        let d = req.files.create(name, FilePurpose::DataFile)?;
        d.set_len(0)?;
        d.flush()?;
    }
    let mut opts = OpenOptions::new().files(req.files.clone());
    opts.limits = req.limits;
    let dev = Qcow2Device::open(storage, &opts)?;
    // Sizing a new image: no zeroing of the (backing-visible) new area.
    crate::resize::resize(&dev, req.size, Preallocation::Off, false, false)?;
    if let Some(e) = &encryption {
        e.install(&dev)?;
    }
    if prealloc != Preallocation::Off {
        crate::resize::preallocate(&dev, prealloc, backing.is_some(), 0)?;
    }
    dev.flush()
}
