//! Cloud and appliance archives written front to back: GCP's `disk.raw` in an oldgnu
//! tar.gz ([`write_gcp`]) and OVF packages ([`write_ova`], [`write_ova_twice`]).
//!
//! An OVA is a ustar archive (DSP0243 "OVF package", §5.3): the OVF descriptor first,
//! then the files in the order of its `References`, then the manifest (the spec allows
//! it at the end, which lets the digests be computed while writing). Its one disk is a
//! stream-optimized VMDK (VMware's layout, [`StreamProfile::esxi`] by default), named
//! `ovf:format="…vmdk.html#streamOptimized"`, uncompressed in the OVF sense (vSphere
//! refuses `ovf:compression`). The manifest holds `SHA256(FILE)= HEX` lines for the
//! descriptor and the disk.
//!
//! A tar header states its member's size before the data, and the disk's compressed
//! size is known only once it is written. Into a seekable file, [`write_ova`] writes
//! placeholders and fills in the disk's header and the descriptor (whose numbers are
//! padded to a fixed length with trailing blanks, allowed after the XML root element)
//! afterwards: one pass. To a pipe, [`write_ova_twice`] deflates the disk once to learn
//! its size and once to write it (deflate output is deterministic): the source is read
//! twice.

use std::io::{Seek, SeekFrom, Write};

use diskimg_blockio::{BlockDevice, Error, Result};
use diskimg_vmdk::StreamProfile;
use sha2::Digest;

use crate::gzip_out::ParallelGzip;
use crate::tar_out::{TarEntry, TarFormat, end_of_archive, header, padding, write_device_member};
use crate::vmdk_out::{VmdkStats, write_vmdk};

fn werr(e: std::io::Error) -> Error {
    Error::io("could not write the output", e)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes `dev` as `disk.raw` in an oldgnu tar.gz: `tar --format=oldgnu -Sczf` output,
/// the layout Compute Engine imports. With `sparse` the member is sparse where the map
/// has holes (the map is walked before the data); a source that can be walked only once
/// (a forward-only stream) takes `sparse = false`: a regular member, its zeroes deflated
/// to almost nothing. Deflates on `threads` threads at gzip's default level; `progress`
/// gets guest bytes.
pub fn write_gcp(
    dev: &dyn BlockDevice,
    out: &mut dyn Write,
    threads: usize,
    sparse: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut gz = ParallelGzip::new(out, 6, threads).map_err(werr)?;
    let n = write_device_member(dev, &mut gz, "disk.raw", now(), sparse, progress)?;
    gz.write_all(&end_of_archive(n)).map_err(werr)?;
    gz.finish().map_err(werr)?;
    Ok(())
}

/// What an OVF package describes besides its disk.
#[derive(Clone, Debug)]
pub struct OvaSpec {
    /// The virtual machine's name; the files are `NAME.ovf`, `NAME-disk1.vmdk`,
    /// `NAME.mf`.
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Guest OS: CIM id (1 other, 101 Linux 64-bit, 102 other 64-bit) and VMware's id.
    pub os: (u32, String),
    /// The disk's descriptor fields.
    pub profile: StreamProfile,
    /// Deflate threads.
    pub threads: usize,
}

impl OvaSpec {
    /// A VM named `name`: 1 vCPU, 1 GiB, "other 64-bit" guest, the ESXi disk profile.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            cpus: 1,
            memory_mib: 1024,
            os: (102, "otherGuest64".into()),
            profile: StreamProfile::esxi(),
            threads: 1,
        }
    }

    fn disk_name(&self) -> String {
        format!("{}-disk1.vmdk", self.name)
    }

    fn check(&self) -> Result<()> {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
        };
        if !ok(&self.name) || !ok(&self.os.1) || !ok(&self.profile.hw_version) {
            return Err(Error::invalid(
                "OVA names: 1 to 64 letters, digits and -_.+ only",
            ));
        }
        Ok(())
    }
}

/// The OVF descriptor (OVF 1.x envelope, VMware's and VirtualBox's readers): one
/// virtual system with CPUs, memory, an LSI Logic SCSI controller and the disk.
/// `sizes` = (disk file bytes, populated bytes), each printed in at least `width`
/// characters (trailing blanks pad the document).
pub fn ovf_descriptor(spec: &OvaSpec, capacity: u64, sizes: (u64, u64)) -> String {
    let name = &spec.name;
    let disk = spec.disk_name();
    let (file_size, populated) = sizes;
    let (os_id, os_type) = (&spec.os.0, &spec.os.1);
    let (cpus, mem) = (spec.cpus, spec.memory_mib);
    let hw = &spec.profile.hw_version;
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{disk}" ovf:id="file1" ovf:size="{file_size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="{populated}"/>
  </DiskSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="{os_id}" vmw:osType="{os_type}">
      <Info>The kind of installed guest operating system</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-{hw:0>2}</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>{mem}MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{mem}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI Controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// The manifest: `SHA256(FILE)= HEX` per file.
fn manifest(files: &[(&str, &[u8])]) -> String {
    files
        .iter()
        .map(|(f, d)| format!("SHA256({f})= {}\n", hex(d)))
        .collect()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A writer that hashes and counts what passes through.
struct Hashing<'a> {
    inner: &'a mut dyn Write,
    sha: sha2::Sha256,
    n: u64,
}

impl Write for Hashing<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.sha.update(b.get(..n).unwrap_or_default());
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a ustar member whose content is in memory.
fn member(out: &mut dyn Write, name: &str, data: &[u8]) -> Result<u64> {
    let e = TarEntry {
        name: name.to_string(),
        size: data.len() as u64,
        mtime: now(),
        sparse: None,
    };
    let h = header(&e, TarFormat::Ustar)?;
    out.write_all(&h).map_err(werr)?;
    out.write_all(data).map_err(werr)?;
    let pad = padding(data.len() as u64);
    out.write_all(&vec![0u8; pad]).map_err(werr)?;
    Ok((h.len() + data.len() + pad) as u64)
}

/// The disk member's header, for a disk of `len` bytes.
fn disk_header(spec: &OvaSpec, len: u64) -> Result<Vec<u8>> {
    let e = TarEntry {
        name: spec.disk_name(),
        size: len,
        mtime: now(),
        sparse: None,
    };
    header(&e, TarFormat::Ustar)
}

/// Writes the disk member's data (the VMDK stream, padding); returns its stats and
/// SHA-256.
fn disk_data(
    dev: &dyn BlockDevice,
    out: &mut dyn Write,
    spec: &OvaSpec,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(VmdkStats, Vec<u8>)> {
    let mut h = Hashing {
        inner: out,
        sha: sha2::Sha256::new(),
        n: 0,
    };
    let name = spec.disk_name();
    let stats = write_vmdk(dev, &mut h, &name, &spec.profile, spec.threads, progress)?;
    let sha = h.sha.finalize().to_vec();
    out.write_all(&vec![0u8; padding(stats.bytes)])
        .map_err(werr)?;
    Ok((stats, sha))
}

/// Ends the package: manifest and end-of-archive blocks.
fn finish(
    out: &mut dyn Write,
    spec: &OvaSpec,
    ovf: &[u8],
    disk_sha: &[u8],
    written: u64,
) -> Result<()> {
    let ovf_sha = sha2::Sha256::digest(ovf).to_vec();
    let mf = manifest(&[
        (&format!("{}.ovf", spec.name), &ovf_sha),
        (&spec.disk_name(), disk_sha),
    ]);
    let n = member(out, &format!("{}.mf", spec.name), mf.as_bytes())?;
    out.write_all(&end_of_archive(written + n)).map_err(werr)?;
    out.flush().map_err(werr)
}

/// Writes `dev` as an OVA into the seekable `out`, in one pass over the source (see the
/// module docs). `progress` gets guest bytes.
pub fn write_ova<F: Write + Seek>(
    dev: &dyn BlockDevice,
    out: &mut F,
    spec: &OvaSpec,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    spec.check()?;
    let cap = dev.virtual_size();
    let base = out.stream_position().map_err(werr)?;
    let widest = ovf_descriptor(spec, cap, (u64::MAX, u64::MAX)).len();
    let ovf_at = base + 512;
    let mut written = member(out, &format!("{}.ovf", spec.name), &vec![b' '; widest])?;
    let disk_at = base + written;
    out.write_all(&[0u8; 512]).map_err(werr)?;
    let (stats, disk_sha) = disk_data(dev, out, spec, progress)?;
    written += 512 + stats.bytes + padding(stats.bytes) as u64;
    let mut ovf = ovf_descriptor(spec, cap, (stats.bytes, stats.grains * 65536)).into_bytes();
    ovf.resize(widest, b' ');
    let end = out.stream_position().map_err(werr)?;
    out.seek(SeekFrom::Start(disk_at)).map_err(werr)?;
    out.write_all(&disk_header(spec, stats.bytes)?)
        .map_err(werr)?;
    out.seek(SeekFrom::Start(ovf_at)).map_err(werr)?;
    out.write_all(&ovf).map_err(werr)?;
    out.seek(SeekFrom::Start(end)).map_err(werr)?;
    finish(out, spec, &ovf, &disk_sha, written)
}

/// Writes `dev` as an OVA to any `out` (a pipe): the disk is deflated twice, once to
/// learn its size for the descriptor and its tar header (see the module docs). The
/// source must read the same both times (not a forward-only stream).
pub fn write_ova_twice(
    dev: &dyn BlockDevice,
    out: &mut dyn Write,
    spec: &OvaSpec,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    spec.check()?;
    let cap = dev.virtual_size();
    let first = write_vmdk(
        dev,
        &mut std::io::sink(),
        &spec.disk_name(),
        &spec.profile,
        spec.threads,
        &mut |d, t| progress(d / 2, t),
    )?;
    let ovf = ovf_descriptor(spec, cap, (first.bytes, first.grains * 65536)).into_bytes();
    let mut written = member(out, &format!("{}.ovf", spec.name), &ovf)?;
    out.write_all(&disk_header(spec, first.bytes)?)
        .map_err(werr)?;
    let (stats, disk_sha) = disk_data(dev, out, spec, &mut |d, t| progress(t / 2 + d / 2, t))?;
    if stats != first {
        return Err(Error::invalid(
            "the source changed between the two passes (the disk came out another size)",
        ));
    }
    written += 512 + stats.bytes + padding(stats.bytes) as u64;
    finish(out, spec, &ovf, &disk_sha, written)
}
