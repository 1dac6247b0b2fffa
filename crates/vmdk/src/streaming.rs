//! Stream-optimized VMDK written front to back, in VMware's own layout (VMware "Virtual
//! Disk Format 5.0" §"Stream-Optimized Compressed Sparse Extents"):
//!
//! 1. the header (version 3, flags: newline check, compressed, markers; `gdOffset` =
//!    `GD_AT_END`, no redundant directory) and the embedded descriptor;
//! 2. from sector [`OVERHEAD`] on, the grains in guest order: each a grain marker
//!    (`lba`, `size`), a zlib stream of the grain, padding to a sector;
//! 3. after the grains of each grain table, that table: a GT marker sector, then 512
//!    four-byte entries (sector offsets of the grain markers); tables mapping nothing
//!    are left out (their directory entry is 0);
//! 4. the grain directory (GD marker, entries), the footer (footer marker, a copy of the
//!    header with the real `gdOffset`) and the end-of-stream marker.
//!
//! Nothing is written twice, so the output can be a pipe. A writer that stops early
//! leaves a file without its footer, which readers refuse (the header alone does not
//! say where the grain directory is).

use std::io::Write;

use diskimg_blockio::{Error, Result};

use crate::descriptor::NewDescriptor;
use crate::descriptor::random_u32;
use crate::header::{
    COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, GD_AT_END, MARKER_EOS,
    MARKER_FOOTER, SECTOR, SparseHeader,
};

/// Grain size of every stream this module writes (128 sectors).
pub const STREAM_GRAIN: u64 = 65536;
const GRAIN_SECTORS: u64 = STREAM_GRAIN / SECTOR;
/// Grain table entries per table.
const GTES: u64 = 512;
/// Sectors of the embedded descriptor.
const DESC_SECTORS: u64 = 20;
/// Sector of the first grain (`overHead`): 64 KiB, as VMware's tools write it.
pub const OVERHEAD: u64 = 128;
/// Stream marker type: grain table follows.
const MARKER_GT: u32 = 1;
/// Stream marker type: grain directory follows.
const MARKER_GD: u32 = 2;
const SECTOR_BYTES: usize = 512;

/// The deflate level of grains. qemu uses zlib's default (6); level 3 (zlib-rs's fast
/// strategy) takes 30% less CPU for 1.7% more output on real images (ext4 image of
/// /usr/share: 0.3836 against 0.3771 of the input; docs/benchmarks.md). Any zlib inflates
/// the streams.
pub(crate) const DEFLATE_LEVEL: u32 = 3;
/// Bytes of a grain marker before its compressed data (`lba` u64, `size` u32).
const GRAIN_MARKER: usize = 12;

/// The descriptor fields of a stream (`ddb.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamProfile {
    /// `ddb.adapterType` (`ide`, `lsilogic`, `buslogic`, `legacyESX`).
    pub adapter_type: String,
    /// `ddb.virtualHWVersion`.
    pub hw_version: String,
    /// `ddb.toolsVersion` (2147483647: "tools provided by the host").
    pub tools_version: String,
}

impl StreamProfile {
    /// qemu-img's defaults: IDE adapter, hardware version 4.
    pub fn qemu() -> Self {
        Self {
            adapter_type: "ide".into(),
            hw_version: "4".into(),
            tools_version: "2147483647".into(),
        }
    }

    /// What vSphere/ESXi import without complaint: an LSI Logic SCSI adapter (ESXi's
    /// default for Linux guests), hardware version 11 (ESXi 6.0 and later; descriptors
    /// left at 4 are flagged by vSphere tooling), `ddb.toolsVersion` present.
    pub fn esxi() -> Self {
        Self {
            adapter_type: "lsilogic".into(),
            hw_version: "11".into(),
            tools_version: "2147483647".into(),
        }
    }
}

/// Deflates grain `grain` (its guest bytes, at most one grain; the last grain of a disk
/// may be shorter and is padded with zeroes to a whole grain, as qemu and VMware write
/// it) into its on-disk record: grain marker, zlib stream, padding to a sector. Grains
/// are independent, so records can be made on several threads.
pub fn grain_record(grain: u64, data: &[u8]) -> Result<Vec<u8>> {
    if data.is_empty() || data.len() as u64 > STREAM_GRAIN {
        return Err(Error::invalid("a grain record holds 1 byte to one grain"));
    }
    let lba = grain.saturating_mul(GRAIN_SECTORS);
    if data.len() as u64 == STREAM_GRAIN {
        return deflate_record(lba, data);
    }
    let mut whole = data.to_vec();
    whole.resize(usize::try_from(STREAM_GRAIN).unwrap_or(65536), 0);
    deflate_record(lba, &whole)
}

/// The record of a grain at sector `lba` holding `data`: grain marker (`lba`, size of
/// the zlib stream), the zlib stream, zero padding to a sector. Shared by the stream
/// writer and the driver's compressed writes, at the driver's deflate level; a grain
/// that [looks incompressible](diskimg_blockio::looks_incompressible) is stored in the
/// stream uncompressed (deflate level 0, as large as deflate's own output would be).
pub(crate) fn deflate_record(lba: u64, data: &[u8]) -> Result<Vec<u8>> {
    let stored = diskimg_blockio::looks_incompressible(data);
    // Room for the marker, the zlib stream (stored blocks add 5 bytes per 64 KiB) and
    // the padding, sized by the grain in memory; the loop below grows it if deflate
    // needs more.
    #[allow(clippy::disallowed_methods, reason = "sized by a buffer in memory")]
    let mut rec = Vec::with_capacity(GRAIN_MARKER + data.len() + data.len() / 64 + 1024);
    rec.extend_from_slice(&lba.to_le_bytes());
    rec.extend_from_slice(&[0; 4]);
    DEFLATE.with_borrow_mut(|[fast, none]| -> Result<()> {
        let level = if stored { 0 } else { DEFLATE_LEVEL };
        let c = if stored { none } else { fast };
        let c =
            c.get_or_insert_with(|| flate2::Compress::new(flate2::Compression::new(level), true));
        // One compressor per thread and level, reset per grain: a fresh one allocates
        // and clears its window and hash tables every time.
        c.reset();
        loop {
            let consumed = usize::try_from(c.total_in()).unwrap_or(usize::MAX);
            let rest = data.get(consumed..).unwrap_or(&[]);
            let st = c
                .compress_vec(rest, &mut rec, flate2::FlushCompress::Finish)
                .map_err(|e| Error::internal(format!("deflate: {e}")))?;
            if st == flate2::Status::StreamEnd {
                return Ok(());
            }
            // Deflate's output is bounded (stored blocks at worst): more is a bug.
            if rec.len() > 2 * data.len() + 4096 {
                return Err(Error::internal("deflate did not finish"));
            }
            rec.reserve(rec.capacity().max(4096));
        }
    })?;
    let size = u32::try_from(rec.len() - GRAIN_MARKER)
        .map_err(|_| Error::internal("compressed grain too large"))?;
    if let Some(s) = rec.get_mut(8..GRAIN_MARKER) {
        s.copy_from_slice(&size.to_le_bytes());
    }
    rec.resize(rec.len().next_multiple_of(SECTOR_BYTES), 0);
    Ok(rec)
}

thread_local! {
    /// This thread's zlib compressors: [driver level, level 0].
    static DEFLATE: std::cell::RefCell<[Option<flate2::Compress>; 2]> =
        const { std::cell::RefCell::new([None, None]) };
}

/// A metadata marker sector: `val` sectors of `kind` follow.
fn marker(val: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    if let Some(s) = m.get_mut(0..8) {
        s.copy_from_slice(&val.to_le_bytes());
    }
    if let Some(s) = m.get_mut(12..16) {
        s.copy_from_slice(&kind.to_le_bytes());
    }
    m
}

/// Writes a stream-optimized VMDK front to back (see the module docs): [`new`] writes
/// the header and descriptor, [`push`] one grain record after another in guest order,
/// [`finish`] the last grain table, the directory, the footer and the end marker.
///
/// [`new`]: StreamWriter::new
/// [`push`]: StreamWriter::push
/// [`finish`]: StreamWriter::finish
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    out: W,
    header: SparseHeader,
    /// Bytes written so far.
    pos: u64,
    grains: u64,
    /// Grain directory: sector of each table written (0: none).
    gd: Vec<u32>,
    /// The table being filled, and its index.
    gt: Vec<u32>,
    gt_index: u64,
    next_grain: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Starts a stream of `size` guest bytes (rounded up to a sector) whose descriptor
    /// names the extent `extent_name` and carries `profile`.
    pub fn new(out: W, size: u64, extent_name: &str, profile: &StreamProfile) -> Result<Self> {
        let sectors = size.div_ceil(SECTOR);
        let grains = sectors.div_ceil(GRAIN_SECTORS);
        let tables = grains.div_ceil(GTES);
        // Grain table entries are u32 sector offsets: the file stays under 2 TiB only if
        // the disk does (compressed grains are rarely larger than the data).
        if sectors > u64::from(u32::MAX) {
            return Err(Error::invalid(
                "image too large for a stream-optimized VMDK (2 TiB at most)",
            ));
        }
        let header = SparseHeader {
            version: 3,
            flags: FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER,
            capacity: sectors,
            granularity: GRAIN_SECTORS,
            desc_offset: 1,
            desc_size: DESC_SECTORS,
            num_gtes_per_gt: 512,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            grain_offset: OVERHEAD,
            unclean_shutdown: 0,
            compress_algorithm: COMPRESSION_DEFLATE,
        };
        let desc = NewDescriptor {
            cid: random_u32(),
            parent_cid: 0xffff_ffff,
            create_type: "streamOptimized",
            parent_hint: None,
            extent_lines: &format!("RW {sectors} SPARSE \"{extent_name}\"\n"),
            hw_version: &profile.hw_version,
            size: sectors * SECTOR,
            adapter_type: &profile.adapter_type,
            tools_version: &profile.tools_version,
        }
        .render();
        if desc.len() as u64 > DESC_SECTORS * SECTOR || extent_name.contains(['"', '\n']) {
            return Err(Error::invalid(
                "vmdk extent name too long or not plain text",
            ));
        }
        let mut w = Self {
            out,
            header,
            pos: 0,
            grains,
            gd: vec![0; usize::try_from(tables).map_err(|_| Error::invalid("too many tables"))?],
            gt: vec![0; 512],
            gt_index: 0,
            next_grain: 0,
        };
        let mut head = vec![0u8; 128 * SECTOR_BYTES];
        head.get_mut(..512)
            .unwrap_or_default()
            .copy_from_slice(&w.header.to_bytes());
        head.get_mut(512..512 + desc.len())
            .unwrap_or_default()
            .copy_from_slice(desc.as_bytes());
        w.write(&head)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.out
            .write_all(b)
            .map_err(|e| Error::io("could not write the output", e))?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    /// Appends the record of `grain` (from [`grain_record`]). Grains come in strictly
    /// increasing order; grains left out read as zeroes.
    pub fn push(&mut self, grain: u64, record: &[u8]) -> Result<()> {
        if grain < self.next_grain || grain >= self.grains {
            return Err(Error::invalid(format!(
                "grain {grain} out of order or past the end of the disk"
            )));
        }
        let lba = record.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok());
        if lba.map(u64::from_le_bytes) != Some(grain * GRAIN_SECTORS)
            || !record.len().is_multiple_of(SECTOR_BYTES)
        {
            return Err(Error::invalid("not the grain record of this grain"));
        }
        let table = grain / GTES;
        if table != self.gt_index {
            self.flush_table()?;
            self.gt_index = table;
        }
        let sector = u32::try_from(self.pos / SECTOR).map_err(|_| {
            Error::invalid("stream-optimized VMDK over 2 TiB (grain offsets are 32-bit)")
        })?;
        if let Some(e) = self
            .gt
            .get_mut(usize::try_from(grain % GTES).unwrap_or(usize::MAX))
        {
            *e = sector;
        }
        self.write(record)?;
        self.next_grain = grain + 1;
        Ok(())
    }

    /// Writes the table being filled, if it maps anything.
    fn flush_table(&mut self) -> Result<()> {
        if self.gt.iter().all(|&e| e == 0) {
            return Ok(());
        }
        let gt_bytes = GTES * 4;
        self.write(&marker(gt_bytes / SECTOR, MARKER_GT))?;
        let sector = u32::try_from(self.pos / SECTOR)
            .map_err(|_| Error::invalid("stream-optimized VMDK over 2 TiB"))?;
        if let Some(e) = self
            .gd
            .get_mut(usize::try_from(self.gt_index).unwrap_or(usize::MAX))
        {
            *e = sector;
        }
        let table: Vec<u8> = self.gt.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.write(&table)?;
        self.gt.fill(0);
        Ok(())
    }

    /// Ends the stream: last grain table, grain directory, footer, end-of-stream
    /// marker. Returns the output and the stream's length in bytes.
    pub fn finish(mut self) -> Result<(W, u64)> {
        self.flush_table()?;
        let mut gd: Vec<u8> = self.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
        gd.resize(gd.len().next_multiple_of(SECTOR_BYTES).max(SECTOR_BYTES), 0);
        self.write(&marker(gd.len() as u64 / SECTOR, MARKER_GD))?;
        let gd_sector = self.pos / SECTOR;
        self.write(&gd)?;
        let mut footer = self.header.clone();
        footer.gd_offset = gd_sector;
        self.write(&marker(1, MARKER_FOOTER))?;
        self.write(&footer.to_bytes())?;
        self.write(&marker(0, MARKER_EOS))?;
        self.out
            .flush()
            .map_err(|e| Error::io("could not write the output", e))?;
        Ok((self.out, self.pos))
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::sync::Arc;

    use diskimg_blockio::{BlockDevice, Driver, MemStorage, OpenOptions, Storage};

    use super::*;
    use crate::stream_read::ForwardStreamDevice;

    /// A guest of `size` bytes with data in the grains listed.
    fn guest(size: usize, grains: &[u64]) -> Vec<u8> {
        let mut g = vec![0u8; size];
        for &i in grains {
            let at = usize::try_from(i * STREAM_GRAIN).unwrap();
            let end = (at + 65536).min(size);
            for (j, b) in g[at..end].iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31) ^ (j as u8) | 1;
            }
        }
        g
    }

    fn stream(g: &[u8], profile: &StreamProfile) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), g.len() as u64, "s.vmdk", profile).unwrap();
        for (i, piece) in g.chunks(65536).enumerate() {
            if piece.iter().any(|&b| b != 0) {
                w.push(i as u64, &grain_record(i as u64, piece).unwrap())
                    .unwrap();
            }
        }
        w.finish().unwrap().0
    }

    fn walk(bytes: &[u8]) -> diskimg_blockio::Result<ForwardStreamDevice> {
        ForwardStreamDevice::open("t", Box::new(std::io::Cursor::new(bytes.to_vec())))
    }

    #[test]
    fn written_stream_reads_back_through_the_driver_and_the_walk() {
        // Two grain tables' worth and a short last grain; a table with no grain.
        let size = 1100 * 65536 + 4096;
        let g = guest(size, &[0, 1, 5, 511, 512, 1099, 1100]);
        let bytes = stream(&g, &StreamProfile::esxi());
        let h = SparseHeader::parse(&bytes[..512]).unwrap();
        assert_eq!((h.version, h.gd_offset), (3, GD_AT_END));
        let text = String::from_utf8_lossy(&bytes[512..4096]);
        assert!(text.contains("ddb.adapterType = \"lsilogic\""), "{text}");
        assert!(text.contains("ddb.virtualHWVersion = \"11\""), "{text}");
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes.clone()));
        let dev = crate::DRIVER.open(storage, &OpenOptions::new()).unwrap();
        let mut back = vec![0u8; size];
        dev.read_at(&mut back, 0).unwrap();
        assert!(back == g);
        let fwd = walk(&bytes).unwrap();
        let mut back = vec![0xffu8; size];
        for (i, piece) in back.chunks_mut(3 << 20).enumerate() {
            fwd.read_at(piece, i as u64 * (3 << 20)).unwrap();
        }
        assert!(back == g);
    }

    #[test]
    fn walk_reports_holes_and_data() {
        let g = guest(40 * 65536, &[3, 4, 30]);
        let fwd = walk(&stream(&g, &StreamProfile::qemu())).unwrap();
        let e = fwd.map(0, 40 * 65536).unwrap();
        assert_eq!((e.len, e.kind.is_present()), (3 * 65536, false));
        // Data runs end where the walk stands (grain 4 is not inflated yet).
        let e = fwd.map(3 * 65536, 37 * 65536).unwrap();
        assert_eq!((e.len, e.kind.is_present()), (65536, true));
        let e = fwd.map(4 * 65536, 36 * 65536).unwrap();
        assert_eq!((e.len, e.kind.is_present()), (65536, true));
        let e = fwd.map(5 * 65536, 35 * 65536).unwrap();
        assert_eq!((e.len, e.kind.is_present()), (25 * 65536, false));
    }

    #[test]
    fn truncated_or_reordered_streams_fail_naming_the_offset() {
        let g = guest(8 * 65536, &[1, 2, 6]);
        let bytes = stream(&g, &StreamProfile::qemu());
        for cut in (512..bytes.len()).step_by(512) {
            let r = walk(&bytes[..cut]).and_then(|d| {
                let mut buf = vec![0u8; g.len()];
                d.read_at(&mut buf, 0)
            });
            let e = r.expect_err("a truncated stream must fail").to_string();
            assert!(e.contains("'t'") && e.contains("offset"), "{cut}: {e}");
        }
        // Grain 2's record moved before grain 1's: out of guest order.
        let r1 = grain_record(1, &g[65536..131072]).unwrap();
        let r2 = grain_record(2, &g[131072..196608]).unwrap();
        let at = 128 * 512;
        let mut swapped = bytes[..at].to_vec();
        swapped.extend_from_slice(&r2);
        swapped.extend_from_slice(&r1);
        swapped.extend_from_slice(&bytes[at + r1.len() + r2.len()..]);
        let d = walk(&swapped).unwrap();
        let mut buf = vec![0u8; g.len()];
        let e = d.read_at(&mut buf, 0).unwrap_err();
        assert!(e.to_string().contains("out of guest order"), "{e}");
        // Every later read replays the same error: still the image's fault, same offset.
        let again = d.read_at(&mut buf, 0).unwrap_err();
        assert!(matches!(again, Error::Corrupt { .. }), "{again:?}");
        assert_eq!(
            (again.to_string(), again.image_offset()),
            (e.to_string(), e.image_offset())
        );
    }

    #[test]
    fn grains_left_behind_the_window_are_an_error() {
        let n = (crate::stream_read::WINDOW / STREAM_GRAIN) as usize + 8;
        let g = guest(n * 65536, &(0..n as u64).collect::<Vec<_>>());
        let d = walk(&stream(&g, &StreamProfile::qemu())).unwrap();
        let mut buf = vec![0u8; 512];
        d.read_at(&mut buf, (n as u64 - 1) * STREAM_GRAIN).unwrap();
        let e = d.read_at(&mut buf, 0).unwrap_err().to_string();
        assert!(e.contains("already passed"), "{e}");
    }

    #[test]
    fn writer_refuses_misuse() {
        let rec = grain_record(3, &[1; 100]).unwrap();
        let mut w = StreamWriter::new(Vec::new(), 10 * 65536, "x", &StreamProfile::qemu()).unwrap();
        assert!(w.push(2, &rec).is_err());
        w.push(3, &rec).unwrap();
        assert!(w.push(3, &rec).is_err());
        assert!(w.push(10, &grain_record(10, &[1]).unwrap()).is_err());
        assert!(grain_record(0, &[]).is_err());
        assert!(StreamWriter::new(Vec::new(), 4 << 40, "x", &StreamProfile::qemu()).is_err());
    }
}
