//! `create`: every qemu-img create option for qcow2, validated with qemu's messages.
//! [`options`] holds the typed options and the one `-o` adapter, [`encrypt`] the
//! encryption of a new image, [`measure`] `qemu-img measure`.

pub(crate) mod encrypt;
pub(crate) mod measure;
pub(crate) mod options;

use std::sync::Arc;

use diskimg_blockio::bytes::WriteBytes;
use diskimg_blockio::{
    BlockDevice, CreateOptionSpec, CreateRequest, Error, FilePurpose, OpenOptions, Preallocation,
    Result, Storage,
};

use crate::create::encrypt::NewEncryption;
use crate::create::options::{Compat, CompressionType, Qcow2CreateOptions};
use crate::device::Qcow2Device;
use crate::disk::ext::Extensions;
use crate::disk::header::{
    AUTOCLEAR_DATA_RAW, COMPAT_LAZY, Header, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2, V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::engine::refcount::set_entry;

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

impl Qcow2CreateOptions {
    /// Writes a new, empty image of `request.size` bytes (rounded up to whole sectors, as
    /// qemu-img does) to the empty `storage`; a data file is created through
    /// `request.files`, an encrypted image's passphrase comes from `request.secrets`.
    /// `request.options` is not read.
    pub fn create(&self, storage: Arc<dyn Storage>, request: &CreateRequest) -> Result<()> {
        create(storage, request, self)
    }
}

/// Creates an empty qcow2 image on `storage` ([`Qcow2CreateOptions::create`]).
fn create(storage: Arc<dyn Storage>, req: &CreateRequest, opts: &Qcow2CreateOptions) -> Result<()> {
    // As qemu: the passphrase and LUKS options first, then the layout rules.
    let encryption = match &opts.encryption {
        Some(e) => Some(NewEncryption::new(e, &req.secrets)?),
        None => None,
    };
    opts.check_create()?;
    // As qemu-img (qcow2_co_create_opts): the size rounds up to whole sectors.
    let size = req
        .size
        .checked_next_multiple_of(512)
        .ok_or(Error::invalid("Image size too large"))?;
    let cluster_size = opts.cluster_size;
    // qemu's size check at create: the L1 table must fit its 32 MiB limit.
    let l2e = if opts.extended_l2 { 16 } else { 8 };
    let l2_tables = size.div_ceil(cluster_size).div_ceil(cluster_size / l2e);
    if l2_tables.saturating_mul(8) > crate::disk::header::MAX_L1_BYTES {
        return Err(Error::invalid(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ));
    }
    let mut h = new_header(opts);
    if let Some(e) = &encryption {
        e.prepare(&mut h)?;
    }
    write_initial_layout(storage.as_ref(), &mut h, opts.backing_file.as_deref())?;
    if let Some(name) = &opts.data_file {
        let d = req.files.create(name, FilePurpose::DataFile)?;
        d.set_len(0)?;
        d.flush()?;
    }
    let mut open = OpenOptions::new().files(req.files.clone());
    open.limits = req.limits;
    let dev = Qcow2Device::open(storage, &open)?;
    // Sizing a new image: no zeroing of the (backing-visible) new area.
    crate::features::resize::resize(&dev, size, Preallocation::Off, false, false)?;
    if let Some(e) = &encryption {
        e.install(&dev)?;
    }
    if opts.preallocation == Preallocation::Off {
        return dev.flush();
    }
    let dev = match opts
        .encryption
        .as_ref()
        .and_then(|e| e.key_secret.as_deref())
    {
        // Preallocated clusters of an encrypted image are written as encrypted zeroes:
        // that needs the image opened with its key.
        Some(id) => {
            dev.flush()?;
            let storage = dev.file.clone();
            drop(dev);
            let mut keyed = open.secrets(req.secrets.clone());
            keyed
                .driver_options
                .set(crate::open_options::KEY_SECRET_OPTION, id);
            Qcow2Device::open(storage, &keyed)?
        }
        None => dev,
    };
    let backing = opts.backing_file.is_some();
    crate::features::resize::preallocate(&dev, opts.preallocation, backing, 0)?;
    dev.flush()
}

/// The header of a new, empty (size 0) image with `opts`' version, cluster size,
/// refcount width, features and extensions; the refcount table is cluster 1.
fn new_header(opts: &Qcow2CreateOptions) -> Header {
    let v3 = opts.compat == Compat::V3;
    let cluster_size = opts.cluster_size;
    let zstd = opts.compression_type == CompressionType::Zstd;
    let flag = |on: bool, bit: u64| if on { bit } else { 0 };
    Header {
        version: opts.compat.version(),
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cluster_size.trailing_zeros(),
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cluster_size,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: flag(zstd, INCOMPAT_COMPRESSION)
            | flag(opts.extended_l2, INCOMPAT_EXTL2)
            | flag(opts.data_file.is_some(), INCOMPAT_DATA_FILE),
        compatible: flag(opts.lazy_refcounts, COMPAT_LAZY),
        autoclear: flag(opts.data_file_raw, AUTOCLEAR_DATA_RAW),
        refcount_order: opts.refcount_bits.trailing_zeros(),
        header_length: if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN },
        compression_type: u8::from(zstd),
        backing_file: opts.backing_file.clone(),
        ext: Extensions {
            backing_format: opts.backing_file.as_ref().and(opts.backing_format.clone()),
            data_file: opts.data_file.clone(),
            features: if v3 {
                Extensions::qemu_feature_table_for(cluster_size)
            } else {
                Vec::new()
            },
            ..Extensions::default()
        },
    }
}

/// Writes cluster 0 (header, extensions, backing file name), the refcount table
/// (cluster 1) and the first refcount block (cluster 2, counting clusters 0-2) to the
/// emptied `storage`.
fn write_initial_layout(
    storage: &dyn Storage,
    h: &mut Header,
    backing: Option<&str>,
) -> Result<()> {
    let cluster_size = h.cluster_size();
    let usz = |v: u64| usize::try_from(v).map_err(|_| Error::invalid("size"));
    let mut cluster0 = vec![0u8; usz(cluster_size)?];
    let ext = h.ext.serialise(h.version);
    let ext_end = u64::from(h.header_length) + ext.len() as u64;
    if let Some(b) = backing {
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
    storage.flush()
}
